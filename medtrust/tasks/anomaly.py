"""SAFEGEN's DDPM anomaly detector: a diffusers ``UNet2DModel`` trained on real images only, which finds,
localises and scores the unreal regions of an image by partial-diffusion reconstruction.

Training is plain denoising (``DDPMScheduler``; β schedule, prediction type and the range of t are
config keys). After training, :meth:`AnomalyTask.post_fit` reconstructs the clean real images of the
calibration split (val when there is none) and fits :class:`~medtrust.anomaly.scoring.AnomalyStats`:
per-pixel residual mean and std, percentiles, and the image and pixel thresholds (``anomaly_stats.pt``).
Evaluation builds the artifact benchmark (:mod:`medtrust.data.artifacts`) from the split's clean images,
scores every image and writes ``metrics/<split>.json`` with ``overall`` and ``cohorts.<name>``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from medtrust.anomaly.reconstruction import mid_embedding, reconstruct
from medtrust.anomaly.scoring import AnomalyStats, residual
from medtrust.evaluation.config import to_plain
from medtrust.generation.sampling import diffusion_target, training_scheduler
from medtrust.tasks.base import EvalResult, ReportSection, RunModel, TaskBase, TrustLine, load_init_weights
from medtrust.utils.io import write_csv, write_json
from medtrust.utils.logging import get_logger

log = get_logger(__name__)
STATS_FILE = "anomaly_stats.pt"
RECON_DEFAULTS = {"t0": 250, "k": 10, "r": 1, "mode": "ddim", "sigma": 1.0, "seed": 0}
SCORE_DEFAULTS = {"top_k_percent": 1.0, "max_flag_rate": 0.05, "pixel_percentile": 99.0, "min_clean_images": 20,
                  "eps": 1e-3, "knn_k": 5}


def _checked(given: Mapping[str, Any] | None, defaults: Mapping[str, Any], key: str) -> dict[str, Any]:
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"{key}: unknown key(s) {unknown}; expected {sorted(defaults)}")
    return {**defaults, **given}


class AnomalyTask(TaskBase):
    """``forward(x)`` is the network's denoising output at the training scheduler's ``t`` (for XAI).

    Args:
        net: a diffusers ``UNet2DModel`` (``medtrust.nets.diffusion.ddpm_unet``).
        loss: :class:`medtrust.losses.diffusion.DiffusionLoss`.
        optimizer, scheduler, scheduler_interval: partials, as every task.
        noise: ``{num_train_timesteps, beta_schedule, prediction_type, beta_start, beta_end}``.
        t_range: ``[low, high)`` of the training timesteps (SAFEGEN trains where it reconstructs).
        reconstruction: ``{t0, k, r, mode (ddim | ancestral), sigma (residual smoothing, px), seed}``.
        scoring: ``{top_k_percent, max_flag_rate, pixel_percentile, min_clean_images, eps, knn_k}`` (``knn_k``:
            neighbours of the contrastive score among the clean reference embeddings).
        val_timesteps: fixed timesteps of the validation loss (same noise every epoch).
    """

    task_name: ClassVar[str] = "anomaly"
    metric_group: ClassVar[str] = "anomaly"
    evaluation_config: ClassVar[str] = "anomaly"
    xai_target_kinds: ClassVar[tuple[str, ...]] = ("anomaly_score",)

    def __init__(self, net: nn.Module, loss: nn.Module, optimizer: Any, scheduler: Any = None,
                 scheduler_interval: str = "step", noise: Mapping[str, Any] | None = None,
                 t_range: Sequence[int] | None = None, reconstruction: Mapping[str, Any] | None = None,
                 scoring: Mapping[str, Any] | None = None, val_timesteps: Sequence[int] = (50, 150, 250, 400),
                 monitor: str = "val/anomaly/loss", monitor_mode: str = "min", init_from: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "loss", "optimizer", "scheduler"])
        self.net, self.loss = net, loss
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.scheduler_interval, self.monitor = scheduler_interval, monitor
        self.noise_scheduler = training_scheduler(**dict(noise or {}))
        T = int(self.noise_scheduler.config.num_train_timesteps)
        lo, hi = (list(t_range) if t_range is not None else [0, T])
        if not 0 <= lo < hi <= T:
            raise ValueError(f"model.t_range=[{lo}, {hi}]: expected 0 <= low < high <= {T} (num_train_timesteps)")
        self.t_range = (int(lo), int(hi))
        self.recon_cfg = _checked(reconstruction, RECON_DEFAULTS, "model.reconstruction")
        self.score_cfg = _checked(scoring, SCORE_DEFAULTS, "model.scoring")
        if not 0 < int(self.recon_cfg["t0"]) < T:
            raise ValueError(f"model.reconstruction.t0={self.recon_cfg['t0']}: expected 0 < t0 < {T}")
        self.val_timesteps = [int(t) for t in val_timesteps]
        self.stats: AnomalyStats | None = None
        self.init_report = load_init_weights(self, init_from) if init_from else None

    # -- training ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.full((x.shape[0],), int(self.recon_cfg["t0"]), dtype=torch.long, device=x.device)
        return self.net(x, t).sample

    def _loss(self, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        noisy = self.noise_scheduler.add_noise(x, noise, t)
        pred = self.net(noisy, t).sample
        return self.loss(pred, diffusion_target(self.noise_scheduler, x, noise, t), t, self.noise_scheduler)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x = batch["image"]
        t = torch.randint(self.t_range[0], self.t_range[1], (x.shape[0],), device=x.device)
        loss = self._loss(x, t, torch.randn_like(x))
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=len(x), prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x = batch["image"]
        g = torch.Generator().manual_seed(1000 + batch_idx)
        losses = []
        for t in self.val_timesteps:
            noise = torch.randn(x.shape, generator=g).to(x)
            losses.append(self._loss(x, torch.full((len(x),), t, dtype=torch.long, device=x.device), noise))
        loss = torch.stack(losses).mean()
        self.log("val/loss", loss, on_epoch=True, batch_size=len(x), prog_bar=True)
        self.log("val/anomaly/loss", loss, on_epoch=True, batch_size=len(x))

    # -- scoring -----------------------------------------------------------------------------------
    @torch.no_grad()
    def residuals(self, x: torch.Tensor, mode: str | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """Residual maps (B×H×W, smoothed as configured) of images ``x`` in the model's range."""
        self.eval()
        c = self.recon_cfg
        rec, info = reconstruct(self.net, self.noise_scheduler, x, int(c["t0"]), int(c["k"]), int(c["r"]),
                                int(c["seed"]), mode or str(c["mode"]))
        return residual(x, rec, float(c["sigma"])), {**info, "reconstruction": rec}

    def check_input(self, x: torch.Tensor, where: str) -> None:
        size = int(self.net.config.sample_size) if isinstance(self.net.config.sample_size, int) else None
        ch = int(self.net.config.in_channels)
        if x.shape[1] != ch or (size is not None and tuple(x.shape[-2:]) != (size, size)):
            raise ValueError(f"{where}: images of {x.shape[1]} channel(s) at {tuple(x.shape[-2:])}, the detector was "
                             f"trained on {ch} channel(s) at {(size, size)} (set data.image_size / data.channels, "
                             "or data.resize to resize)")

    def _split_residuals(self, dm: Any, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual maps and mid-block embeddings of every image of ``split``."""
        res, emb = [], []
        for batch in dm.dataloader(split):
            self.check_input(batch["image"], f"split {split}")
            res.append(self.residuals(batch["image"])[0])
            emb.append(self.embeddings(batch["image"]))
        return torch.cat(res), torch.cat(emb)

    # -- the contract ------------------------------------------------------------------------------
    def post_fit(self, datamodule: Any, run_dir: Path, evaluation: Any = None) -> dict[str, Any]:
        """Residual statistics and thresholds of clean real images of the calibration split (val when
        there is none), written to ``anomaly_stats.pt``."""
        split = "cal" if datamodule.has_split("cal") else "val"
        res, emb = self._split_residuals(datamodule, split)
        s = self.score_cfg
        self.stats = AnomalyStats.fit(res, min_images=int(s["min_clean_images"]), top_k_percent=float(s["top_k_percent"]),
                                      sigma=float(self.recon_cfg["sigma"]), eps=float(s["eps"]),
                                      max_flag_rate=float(s["max_flag_rate"]),
                                      pixel_percentile=float(s["pixel_percentile"]), fitted_on=split)
        self.stats.fit_reference(emb, int(s["knn_k"]))
        path = Path(run_dir) / STATS_FILE
        if not path.exists():
            self.stats.save(path)
        return self._stats_summary(self.stats)

    @staticmethod
    def _stats_summary(stats: AnomalyStats) -> dict[str, Any]:
        return {"fitted_on": stats.fitted_on, "n_images": stats.n_images, "image_threshold": stats.image_threshold,
                "pixel_threshold": stats.pixel_threshold, "top_k_percent": stats.top_k_percent,
                "score_percentiles": stats.score_percentiles, "pixel_percentiles": stats.pixel_percentiles}

    @classmethod
    def load_post_fit(cls, run_dir: Path) -> dict[str, Any] | None:
        p = Path(run_dir) / STATS_FILE
        return {**cls._stats_summary(AnomalyStats.load(p)), "path": str(p)} if p.is_file() else None

    def _stats_for(self, fitted: Mapping[str, Any] | None) -> AnomalyStats:
        if self.stats is None and fitted and fitted.get("path"):
            self.stats = AnomalyStats.load(fitted["path"])
        if self.stats is None:
            raise ValueError("no residual statistics of clean real images: run post_fit (train.py does) or point "
                             f"evaluate.py at a run folder with {STATS_FILE}")
        return self.stats

    def evaluate_split(self, datamodule: Any, split: str, out_dir: Path, evaluation: Any = None,
                       extra: Mapping[str, Any] | None = None, fitted: Mapping[str, Any] | None = None) -> EvalResult:
        from medtrust.evaluation.anomaly import evaluate_anomaly

        return evaluate_anomaly(self, datamodule, split, Path(out_dir), evaluation, extra, self._stats_for(fitted))

    @classmethod
    def report_sections(cls, run_dir: Path, metrics: Mapping[str, Mapping[str, Any]]) -> list[ReportSection]:
        from medtrust.report.anomaly import anomaly_sections

        return anomaly_sections(Path(run_dir), metrics)

    @classmethod
    def trust_summary(cls, run_dir: Path, metrics: Mapping[str, Mapping[str, Any]]) -> list[TrustLine]:
        from medtrust.report.anomaly import anomaly_trust_lines

        return anomaly_trust_lines(Path(run_dir), metrics)

    # -- explanations: the anomaly score itself ----------------------------------------------------
    def fix_xai_target(self, images: torch.Tensor, spec: Mapping[str, Any], masks: torch.Tensor | None,
                       labels: torch.Tensor | None) -> torch.Tensor | None:
        return None

    def explain_target(self, output: torch.Tensor, fixed: torch.Tensor | None, kind: str) -> torch.Tensor:
        if kind != "anomaly_score":
            raise ValueError(f"xai target kind {kind!r}: an anomaly run explains 'anomaly_score'")
        return output.flatten(1).pow(2).mean(1)  # the size of the predicted noise at t0: large where unreal

    def explain_view(self, images: torch.Tensor, labels: torch.Tensor | None) -> dict[str, Any]:
        res, _ = self.residuals(images)
        z = self.stats.zscore(res) if self.stats is not None else res
        scores = self.stats.image_scores(res) if self.stats is not None else res.flatten(1).mean(1)
        return {"pred": z.numpy(), "captions": [f"score {float(s):.2f}" for s in scores], "pixel_prob": None}

    @classmethod
    def compare(cls, runs: Sequence[RunModel], datamodule: Any, split: str, out_dir: Path,
                evaluation: Any = None, n_show: int = 6) -> list[dict[str, Any]]:
        rows = []
        for r in runs:
            res = r.task.evaluate_split(datamodule, split, Path(out_dir) / r.label, evaluation,
                                        fitted=r.fitted)
            o = res.metrics["overall"]
            rows.append({"run": r.label, "run_dir": str(r.run_dir), "auroc": o.get("auroc"),
                         "pixel_auroc": o.get("pixel_auroc"), "dice": o.get("dice")})
        return rows

    def embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """Mid-block embeddings at t0 (the contrastive score's features)."""
        return mid_embedding(self.net, self.noise_scheduler, x, int(self.recon_cfg["t0"]), int(self.recon_cfg["seed"]))
