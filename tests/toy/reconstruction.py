"""A toy third task, kept in the test tree: identity reconstruction (an auto-encoder that should
give back its input). It implements the task contract (medtrust.tasks.base.Task) and nothing in
``medtrust/`` knows it: it trains, evaluates, compares, explains and reports through the generic
paths, its configs come from ``hydra.searchpath=[file://tests/toy/conf]`` and its report section
from its own template folder. That is the proof that a new task (the generator, the anomaly
detector) fits without touching shared code."""
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
from medtrust.tasks.base import EvalResult, ReportSection, RunModel, TaskBase, TrustLine
from medtrust.utils.io import write_csv, write_json

TEMPLATES = Path(__file__).parent / "templates"


class ToyNet(nn.Module):
    """Two convolutions with a dropout in between (so MC-dropout stability is defined)."""

    def __init__(self, channels: int = 3, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.dropout = nn.Dropout(0.1)
        self.conv2 = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.dropout(torch.relu(self.conv1(x))))


class ReconstructionTask(TaskBase):
    """``forward`` returns the residual ``x - reconstruction`` (B×C×H×W); the explained scalar is
    the mean squared residual of each image."""

    task_name: ClassVar[str] = "reconstruction"
    metric_group: ClassVar[str] = "rec"
    evaluation_config: ClassVar[str] = "reconstruction"
    xai_target_kinds: ClassVar[tuple[str, ...]] = ("recon_error",)

    def __init__(self, net: nn.Module, loss: nn.Module, optimizer: Any, monitor: str = "val/rec/mse",
                 monitor_mode: str = "min", init_from: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "loss", "optimizer"])
        self.net, self.loss, self.optimizer_factory, self.monitor = net, loss, optimizer, monitor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.net(x)

    def _step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        x = batch["image"]
        loss = self.loss(self.net(x), x)
        self.log(f"{stage}/loss", loss, on_epoch=True, on_step=stage == "train", batch_size=len(x))
        if stage != "train":
            self.log(f"{stage}/rec/mse", loss, on_epoch=True, batch_size=len(x))
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "val")

    @torch.no_grad()
    def per_image_mse(self, dm: Any, split: str) -> tuple[np.ndarray, list[dict]]:
        self.eval()
        errs, index = [], []
        for batch in dm.dataloader(split):
            errs.append(self(batch["image"]).pow(2).flatten(1).mean(1))
            index.append(batch["index"])
        order = torch.cat(index).argsort()
        return torch.cat(errs)[order].numpy(), dm.load_split(split)[2]

    # -- the contract ----------------------------------------------------------------------------
    def post_fit(self, datamodule: Any, run_dir: Path, evaluation: Any = None) -> dict[str, Any]:
        mse, _ = self.per_image_mse(datamodule, "val")
        stats = {"fitted_on": "val", "n_images": len(mse), "mse_mean": float(mse.mean()), "mse_std": float(mse.std())}
        write_json(Path(run_dir) / "recon_stats.json", stats)
        return stats

    @classmethod
    def load_post_fit(cls, run_dir: Path) -> dict[str, Any] | None:
        p = Path(run_dir) / "recon_stats.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def evaluate_split(self, datamodule: Any, split: str, out_dir: Path, evaluation: Any = None,
                       extra: Mapping[str, Any] | None = None, fitted: Mapping[str, Any] | None = None) -> EvalResult:
        out_dir = Path(out_dir)
        mse, recs = self.per_image_mse(datamodule, split)
        z = (mse - fitted["mse_mean"]) / max(fitted["mse_std"], 1e-12) if fitted else np.full_like(mse, np.nan)
        per = pd.DataFrame({"id": [r["id"] for r in recs], "mse": mse, "z": z})
        attrs = attribute_frame(recs, "auto")
        per = pd.concat([per, attrs], axis=1)
        table = write_csv(out_dir / "metrics" / f"{split}_reconstruction.csv", per)
        fig = out_dir / "figures" / split / "mse_hist.png"
        fig.parent.mkdir(parents=True, exist_ok=True)
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        plt.figure(figsize=(3, 2)); plt.hist(mse, bins=10); plt.xlabel("MSE"); plt.savefig(fig); plt.close()
        n_boot = int(evaluation.bootstrap) if evaluation is not None else 200
        metrics = {"split": split, "task": self.task_name, "metric_group": self.metric_group, "metric_groups": ["rec"],
                   "n_images": len(mse), "rec": {"mse": float(mse.mean()), "psnr": float(10 * np.log10(1 / mse.mean()))},
                   "ci95": {"mse": bootstrap_mean_ci(mse, n_boot=n_boot)}, "fitted": dict(fitted or {}),
                   "data": datamodule.summary(), "tables": {"reconstruction": str(table)},
                   "trust_thresholds": to_plain(evaluation.trust) if evaluation is not None else {}, **dict(extra or {})}
        if len(attrs.columns):
            metrics["subgroups"] = segmentation_subgroups(per, list(attrs.columns), ("mse",), 10, n_boot)
        write_json(out_dir / "metrics" / f"{split}.json", metrics)
        return EvalResult(split, self.task_name, self.metric_group, metrics, {"reconstruction": table}, [fig])

    @classmethod
    def report_sections(cls, run_dir: Path, metrics: Mapping[str, Mapping[str, Any]]) -> list[ReportSection]:
        rows = [{"split": s, **m["rec"], "fitted on": (m.get("fitted") or {}).get("fitted_on")} for s, m in metrics.items()]
        return [ReportSection("toy_reconstruction.html.j2", {"rows": rows}, [TEMPLATES])]

    @classmethod
    def trust_summary(cls, run_dir: Path, metrics: Mapping[str, Mapping[str, Any]]) -> list[TrustLine]:
        split = report_split(metrics)
        if split is None:
            return []
        m, where = metrics[split], f"{split} ({metrics[split]['n_images']} images)"
        th = m.get("trust_thresholds") or {"mse_max": 0.05, "gap_max": 0.01, "alpha": 0.05}
        return [threshold_line("accuracy", "reconstruction MSE", m["rec"]["mse"], m["ci95"]["mse"], float(th["mse_max"]),
                               False, ("reconstructs", "does not reconstruct"), "weights: train", where),
                subgroup_line(m, ("mse",), float(th["gap_max"]), float(th["alpha"]), where)]

    def fix_xai_target(self, images: torch.Tensor, spec: Mapping[str, Any], masks: torch.Tensor | None,
                       labels: torch.Tensor | None) -> None:
        return None  # the whole image's error: nothing to fix

    def explain_target(self, output: torch.Tensor, fixed: torch.Tensor | None, kind: str) -> torch.Tensor:
        return output.pow(2).flatten(1).mean(1)

    def explain_outcome(self, images: torch.Tensor, fixed: torch.Tensor | None, masks: torch.Tensor | None,
                        labels: torch.Tensor | None, evaluation: Any = None) -> dict[str, Any] | None:
        with torch.no_grad():
            err = self(images).pow(2).flatten(1).mean(1).numpy()
        return {"uncertainty": err, "correct": err <= np.median(err)}

    def explain_view(self, images: torch.Tensor, labels: torch.Tensor | None) -> dict[str, Any]:
        with torch.no_grad():
            res = self(images).abs().mean(1)
        return {"pred": res.numpy(), "captions": [f"err {float(e):.4f}" for e in res.flatten(1).mean(1)],
                "pixel_prob": None}

    @classmethod
    def compare(cls, runs: Sequence[RunModel], datamodule: Any, split: str, out_dir: Path,
                evaluation: Any = None, n_show: int = 6) -> list[dict[str, Any]]:
        rows = []
        for r in runs:
            mse, _ = r.task.per_image_mse(datamodule, split)
            rows.append({"run": r.label, "run_dir": str(r.run_dir), "mse": float(mse.mean()),
                         "z_fitted": (r.fitted or {}).get("mse_mean")})
        return rows
