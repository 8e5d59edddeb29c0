"""Stage 1 of latent diffusion: a diffusers ``AutoencoderKL`` trained in the project.

Its post-fit step is the latent scaling factor of Stable Diffusion (``1 / std`` of the latents,
fitted on val, written to ``vae_stats.json``), which the generator (stage 2) reads with the
weights when it points at this run (``model.vae_run=<run>``). Evaluation reports reconstruction
L1, PSNR and SSIM per image, per modality and per subgroup.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from medtrust.evaluation.config import to_plain
from medtrust.metrics.stats import bootstrap_mean_ci
from medtrust.metrics.subgroups import attribute_frame, segmentation_subgroups
from medtrust.report.trust import report_split, subgroup_line, threshold_line
from medtrust.tasks.base import EvalResult, ReportSection, RunModel, TaskBase, TrustLine, load_init_weights
from medtrust.utils.io import load_tensors, read_json, write_csv, write_json

TEMPLATES = Path(__file__).parent.parent / "report" / "templates"
STATS_FILE = "vae_stats.json"


def image_quality(rec: torch.Tensor, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-image L1, PSNR (dB) and SSIM of reconstructions ``rec`` of ``x`` (both in [0, 1])."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    l1 = (rec - x).abs().flatten(1).mean(1)
    mse = (rec - x).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    s = ssim(rec, x, data_range=1.0, reduction="none")
    return {"l1": l1.numpy(), "psnr": (10 * torch.log10(1 / mse)).numpy(), "ssim": s.numpy()}


class AutoencoderTask(TaskBase):
    """``forward(x)`` gives the reconstruction from the posterior mean (inputs in [-1, 1])."""

    task_name: ClassVar[str] = "autoencoder"
    metric_group: ClassVar[str] = "vae"
    evaluation_config: ClassVar[str] = "autoencoder"
    xai_target_kinds: ClassVar[tuple[str, ...]] = ("recon_error",)

    def __init__(self, net: nn.Module, loss: nn.Module, optimizer: Any, scheduler: Any = None,
                 scheduler_interval: str = "step", monitor: str = "val/vae/l1", monitor_mode: str = "min",
                 init_from: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "loss", "optimizer", "scheduler"])
        self.net, self.loss = net, loss
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.scheduler_interval, self.monitor = scheduler_interval, monitor
        self.init_report = load_init_weights(self, init_from) if init_from else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.decode(self.net.encode(x).latent_dist.mean).sample

    def _step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        x = batch["image"]
        post = self.net.encode(x).latent_dist
        z = post.sample() if stage == "train" else post.mean
        rec = self.net.decode(z).sample
        loss, parts = self.loss(rec, x, post.kl())
        n = len(x)
        self.log(f"{stage}/loss", loss, on_epoch=True, on_step=stage == "train", batch_size=n, prog_bar=True)
        if stage != "train":
            self.log(f"{stage}/vae/l1", parts["rec"] if self.loss.reconstruction == "l1" else (rec - x).abs().mean(),
                     on_epoch=True, batch_size=n)
            self.log(f"{stage}/vae/kl", parts["kl"], on_epoch=True, batch_size=n)
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "val")

    @torch.no_grad()
    def reconstruct_split(self, dm: Any, split: str) -> tuple[dict[str, np.ndarray], list[dict], torch.Tensor, torch.Tensor]:
        """Per-image quality on ``split`` (display range [0, 1]) and the first images + reconstructions."""
        self.eval()
        out: dict[str, list[np.ndarray]] = {"l1": [], "psnr": [], "ssim": []}
        index, shown_x, shown_r = [], [], []
        for batch in dm.dataloader(split):
            x = batch["image"]
            rec = self(x).clamp(-1, 1)
            xd, rd = dm.to_display(x).clamp(0, 1), dm.to_display(rec).clamp(0, 1)
            for k, v in image_quality(rd, xd).items():
                out[k].append(v)
            index.append(batch["index"])
            if len(shown_x) < 1:
                shown_x.append(xd[:8]), shown_r.append(rd[:8])
        order = torch.cat(index).argsort().numpy()
        return ({k: np.concatenate(v)[order] for k, v in out.items()}, dm.load_split(split)[2],
                torch.cat(shown_x), torch.cat(shown_r))

    @torch.no_grad()
    def latents_of(self, dm: Any, split: str, max_images: int = 2048) -> torch.Tensor:
        self.eval()
        zs, n = [], 0
        for batch in dm.dataloader(split):
            zs.append(self.net.encode(batch["image"]).latent_dist.mean)
            n += len(zs[-1])
            if n >= max_images:
                break
        return torch.cat(zs)

    # -- the contract ----------------------------------------------------------------------------
    def post_fit(self, datamodule: Any, run_dir: Path, evaluation: Any = None) -> dict[str, Any]:
        split = "cal" if datamodule.has_split("cal") else "val"
        z = self.latents_of(datamodule, split)
        std = float(z.std())
        stats = {"fitted_on": split, "n_images": int(len(z)), "latent_mean": float(z.mean()), "latent_std": std,
                 "scaling_factor": 1.0 / max(std, 1e-6), "latent_shape": list(z.shape[1:])}
        write_json(Path(run_dir) / STATS_FILE, stats)
        return stats

    @classmethod
    def load_post_fit(cls, run_dir: Path) -> dict[str, Any] | None:
        p = Path(run_dir) / STATS_FILE
        return read_json(p) if p.is_file() else None

    def evaluate_split(self, datamodule: Any, split: str, out_dir: Path, evaluation: Any = None,
                       extra: Mapping[str, Any] | None = None, fitted: Mapping[str, Any] | None = None) -> EvalResult:
        from medtrust.report.figures import plot_image_grid

        out_dir = Path(out_dir)
        q, recs, xs, rs = self.reconstruct_split(datamodule, split)
        per = pd.DataFrame({"id": [r["id"] for r in recs], **q})
        attrs = attribute_frame(recs, "auto")
        per = pd.concat([per, attrs], axis=1)
        table = write_csv(out_dir / "metrics" / f"{split}_reconstruction.csv", per)
        grid = {"input": [(x.permute(1, 2, 0).numpy(), "") for x in xs],
                "reconstruction": [(r.permute(1, 2, 0).numpy(), f"PSNR {q['psnr'][i]:.1f}") for i, r in enumerate(rs)]}
        fig = plot_image_grid(grid, out_dir / "figures" / split / "reconstructions.png", f"{split}: reconstructions")
        n_boot = int(evaluation.bootstrap) if evaluation is not None else 200
        metrics: dict[str, Any] = {
            "split": split, "task": self.task_name, "metric_group": self.metric_group, "metric_groups": ["vae"],
            "n_images": len(per), "vae": {k: float(np.mean(v)) for k, v in q.items()},
            "ci95": {k: bootstrap_mean_ci(v, n_boot=n_boot) for k, v in q.items()},
            "fitted": dict(fitted or {}), "data": datamodule.summary(), "tables": {"reconstruction": str(table)},
            "trust_thresholds": to_plain(evaluation.trust) if evaluation is not None else {}, **dict(extra or {})}
        if "modality" in per:
            metrics["modalities"] = {str(m): {k: float(g[k].mean()) for k in q} | {"n": int(len(g))}
                                     for m, g in per.groupby("modality")}
        if len(attrs.columns):
            metrics["subgroups"] = segmentation_subgroups(per, list(attrs.columns), ("psnr", "ssim"),
                                                          int(evaluation.subgroups.min_group_size) if evaluation else 10,
                                                          int(evaluation.subgroups.bootstrap) if evaluation else 200)
        write_json(out_dir / "metrics" / f"{split}.json", metrics)
        return EvalResult(split, self.task_name, self.metric_group, metrics, {"reconstruction": table}, [fig])

    @classmethod
    def report_sections(cls, run_dir: Path, metrics: Mapping[str, Mapping[str, Any]]) -> list[ReportSection]:
        rows = [{"split": s, "n": m.get("n_images"), **m.get("vae", {})} for s, m in metrics.items()]
        mods = {s: m.get("modalities") or {} for s, m in metrics.items()}
        stats = cls.load_post_fit(run_dir)
        return [ReportSection("generation/autoencoder.html.j2", {"rows": rows, "modalities": mods, "stats": stats})]

    @classmethod
    def trust_summary(cls, run_dir: Path, metrics: Mapping[str, Mapping[str, Any]]) -> list[TrustLine]:
        split = report_split(metrics)
        if split is None:
            return []
        m = metrics[split]
        where = f"{split} ({m.get('n_images')} images)"
        th = m.get("trust_thresholds") or {"psnr_min": 25.0, "gap_max": 1.0, "alpha": 0.05}
        return [threshold_line("accuracy", "reconstruction PSNR (dB)", m["vae"]["psnr"], m["ci95"]["psnr"],
                               float(th["psnr_min"]), True, ("reconstructs", "loses detail"), "weights: train", where),
                subgroup_line(m, ("psnr",), float(th["gap_max"]), float(th["alpha"]), where)]

    def fix_xai_target(self, images: torch.Tensor, spec: Mapping[str, Any], masks: torch.Tensor | None,
                       labels: torch.Tensor | None) -> None:
        return None

    def explain_target(self, output: torch.Tensor, fixed: torch.Tensor | None, kind: str) -> torch.Tensor:
        raise ValueError("autoencoder runs explain the reconstruction error through explain_view only")

    def explain_view(self, images: torch.Tensor, labels: torch.Tensor | None) -> dict[str, Any]:
        with torch.no_grad():
            err = (self(images) - images).abs().mean(1)
        return {"pred": err.numpy(), "captions": [f"L1 {float(e):.4f}" for e in err.flatten(1).mean(1)],
                "pixel_prob": None}

    @classmethod
    def compare(cls, runs: Sequence[RunModel], datamodule: Any, split: str, out_dir: Path,
                evaluation: Any = None, n_show: int = 6) -> list[dict[str, Any]]:
        rows = []
        for r in runs:
            q, _, _, _ = r.task.reconstruct_split(datamodule, split)
            rows.append({"run": r.label, "run_dir": str(r.run_dir), **{k: float(np.mean(v)) for k, v in q.items()},
                         "scaling_factor": (r.fitted or {}).get("scaling_factor")})
        return rows


def read_vae_run(run_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The autoencoder weights (``net.`` prefix removed) and ``vae_stats.json`` of a stage-1 run.

    Raises:
        FileNotFoundError: the run, its checkpoint or its statistics are missing (naming which).
    """
    from medtrust.runs.rundir import find_checkpoint

    rd = Path(str(run_dir)).expanduser()
    stats_path = rd / STATS_FILE
    if not stats_path.is_file():
        raise FileNotFoundError(f"model.vae_run={run_dir}: no {STATS_FILE} in {rd} (expected a finished "
                                "autoencoder run: python train.py experiment=minim_vae)")
    ckpt = find_checkpoint(rd, "best")
    state = load_tensors(ckpt, "checkpoint")
    sd = state.get("state_dict", state)
    weights = {k[len("net."):]: v for k, v in sd.items() if k.startswith("net.")}
    if not weights:
        raise FileNotFoundError(f"model.vae_run={run_dir}: {ckpt} holds no autoencoder weights (net.*)")
    return weights, json.loads(stats_path.read_text())
