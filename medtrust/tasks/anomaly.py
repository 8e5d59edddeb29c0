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
import torch
import torch.nn as nn

from medtrust.anomaly.reconstruction import mid_embedding, reconstruct
from medtrust.anomaly.scoring import IMAGE_SCORES, AnomalyStats, residual
from medtrust.evaluation.config import to_plain
from medtrust.generation.sampling import diffusion_target, training_scheduler
from medtrust.tasks.base import EvalResult, ReportSection, RunModel, TaskBase, TrustLine, load_init_weights
from medtrust.utils.logging import get_logger

log = get_logger(__name__)
STATS_FILE = "anomaly_stats.pt"
RECON_DEFAULTS = {"t0": 50, "k": 2, "r": 4, "mode": "ddim", "sigma": 1.0, "seed": 0,
                  # mode phanes (a baseline): the coarse stage (self = this DDPM at t0, or an autoencoder run
                  # folder), the share of pixels it flags, their dilation, and the inpainting chain
                  "phanes_coarse": "self", "phanes_mask_percent": 5.0, "phanes_dilate": 2, "phanes_t": 250,
                  "phanes_k": 10}
RECON_MODES = ("ddim", "ancestral", "phanes")
PHANES_KEYS = ("phanes_coarse", "phanes_mask_percent", "phanes_dilate", "phanes_t", "phanes_k")
SCORE_DEFAULTS = {"image_score": "excess", "excess_z": 4.0, "top_k_percent": 1.0, "max_flag_rate": 0.05,
                  "pixel_percentile": 99.0, "min_clean_images": 20, "eps": 1e-3, "knn_k": 5, "threshold_fraction": 0.5}


def _t0_list(t0: Any, T: int, key: str) -> int | list[int]:
    """``t0`` as an int, or a sorted list of distinct ints (several noise levels, fused by the per-pixel
    maximum of their z-maps), each in (0, T); a list of one is that int."""
    is_seq = not isinstance(t0, (str, bytes)) and hasattr(t0, "__iter__")
    try:
        ints = sorted(int(v) for v in t0) if is_seq else [int(t0)]
    except (TypeError, ValueError):
        raise ValueError(f"{key}={t0!r}: expected an integer or a list of integers") from None
    if not ints or any(not 0 < v < T for v in ints) or len(set(ints)) != len(ints):
        raise ValueError(f"{key}={t0!r}: expected 0 < t0 < {T} (num_train_timesteps), distinct when a list")
    return ints if len(ints) > 1 else ints[0]


def t0_levels(t0: int | Sequence[int]) -> list[int]:
    """The noise levels of a ``reconstruction.t0`` setting (ascending)."""
    return sorted(int(v) for v in t0) if isinstance(t0, (list, tuple)) else [int(t0)]


def _checked(given: Mapping[str, Any] | None, defaults: Mapping[str, Any], key: str) -> dict[str, Any]:
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"{key}: unknown key(s) {unknown}; expected {sorted(defaults)}")
    out = {**defaults, **given}
    if "image_score" in out and out["image_score"] not in IMAGE_SCORES:
        raise ValueError(f"{key}.image_score={out['image_score']!r}: expected one of {list(IMAGE_SCORES)}")
    return out


class AnomalyTask(TaskBase):
    """``forward(x)`` is the network's denoising output at the training scheduler's ``t`` (for XAI).

    Args:
        net: a diffusers ``UNet2DModel`` (``medtrust.nets.diffusion.ddpm_unet``).
        loss: :class:`medtrust.losses.diffusion.DiffusionLoss`.
        optimizer, scheduler, scheduler_interval: partials, as every task.
        noise: ``{num_train_timesteps, beta_schedule, prediction_type, beta_start, beta_end}``.
        t_range: ``[low, high)`` of the training timesteps (SAFEGEN trains where it reconstructs).
        reconstruction: ``{t0, k, r, mode (ddim | ancestral), sigma (residual smoothing, px), seed}``.
        scoring: ``{image_score (top_k | excess), excess_z, threshold_fraction (share of the calibration images
            held out from the per-pixel statistics to fit the thresholds on), top_k_percent, max_flag_rate, pixel_percentile, min_clean_images, eps, knn_k}`` (``knn_k``:
            neighbours of the contrastive score among the clean reference embeddings).
        val_timesteps: fixed timesteps of the validation loss (same noise every epoch).
    """

    task_name: ClassVar[str] = "anomaly"
    metric_group: ClassVar[str] = "anomaly"
    evaluation_config: ClassVar[str] = "anomaly"
    xai_target_kinds: ClassVar[tuple[str, ...]] = ("anomaly_score",)
    recon_defaults: ClassVar[dict[str, Any]] = RECON_DEFAULTS

    def __init__(self, net: nn.Module, loss: nn.Module, optimizer: Any, scheduler: Any = None,
                 scheduler_interval: str = "step", noise: Mapping[str, Any] | None = None,
                 t_range: Sequence[int] | None = None, reconstruction: Mapping[str, Any] | None = None,
                 scoring: Mapping[str, Any] | None = None, val_timesteps: Sequence[int] = (10, 50, 100, 200),
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
        self.recon_cfg["t0"] = _t0_list(self.recon_cfg["t0"], T, "model.reconstruction.t0")
        self._check_mode("model.reconstruction")
        self._coarse: Any = None
        self.val_timesteps = [int(t) for t in val_timesteps]
        self.stats: AnomalyStats | None = None
        self.init_report = load_init_weights(self, init_from) if init_from else None

    # -- training ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The one-step reconstruction residual ``x − x̂₀``: ``x`` noised to t₀ with a fixed seeded draw
        (so the same image gives the same output), denoised in one network evaluation. Differentiable,
        so its mean square — the ``anomaly_score`` XAI target — can be attributed to pixels."""
        noise = torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(int(self.recon_cfg["seed"])))
        noise = noise.to(x).expand_as(x)
        kind = self.noise_scheduler.config.prediction_type
        out = []
        for t0 in t0_levels(self.recon_cfg["t0"]):  # several noise levels: their residuals side by side
            t = torch.full((x.shape[0],), t0, dtype=torch.long, device=x.device)
            xt = self.noise_scheduler.add_noise(x, noise, t)
            pred = self.net(xt, t).sample
            a = self.noise_scheduler.alphas_cumprod.to(x)[t0]
            if kind == "epsilon":
                x0 = (xt - (1 - a).sqrt() * pred) / a.sqrt()
            elif kind == "v_prediction":
                x0 = a.sqrt() * xt - (1 - a).sqrt() * pred
            else:
                x0 = pred
            out.append(x - x0)
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)

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

    def _check_mode(self, key: str) -> None:
        c = self.recon_cfg
        if str(c["mode"]) not in RECON_MODES:
            raise ValueError(f"{key}.mode={c['mode']!r}: expected one of {list(RECON_MODES)}")
        if str(c["mode"]) == "phanes":
            T = int(self.noise_scheduler.config.num_train_timesteps)
            if not 0 < int(c["phanes_t"]) < T:
                raise ValueError(f"{key}.phanes_t={c['phanes_t']}: expected 0 < t < {T}")
            if not 0 < float(c["phanes_mask_percent"]) < 100:
                raise ValueError(f"{key}.phanes_mask_percent={c['phanes_mask_percent']}: expected 0 < percent < 100")

    def _coarse_task(self) -> Any:
        """PHANES's coarse stage when it is an autoencoder run (loaded once, through the run-folder checks)."""
        if self._coarse is None:
            from medtrust.runs.builders import rebuild_task
            from medtrust.runs.rundir import find_checkpoint, load_run_config

            run = str(self.recon_cfg["phanes_coarse"])
            try:
                cfg = load_run_config(run)
            except Exception as err:  # missing folder, no config, a target outside the policy
                raise ValueError(f"reconstruction.phanes_coarse={run}: {err} (expected self or an experiment=safegen_ae "
                                 "run folder)") from err
            if "AutoencoderAnomalyTask" not in str(cfg.model._target_):
                raise ValueError(f"reconstruction.phanes_coarse={run}: expected an autoencoder anomaly run "
                                 f"(experiment=safegen_ae), found {cfg.model._target_}")
            self._coarse = rebuild_task(cfg, find_checkpoint(run, "best")).eval()
        return self._coarse

    @torch.no_grad()
    def _phanes(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """PHANES-style pseudo-healthy image (:mod:`medtrust.anomaly.phanes`) and what it cost."""
        from medtrust.anomaly.phanes import coarse_mask, inpaint

        c = self.recon_cfg
        sigma = float(c["sigma"])
        if str(c["phanes_coarse"]) == "self":
            coarse, info = self.reconstruct(x, "ddim")
            init, n_coarse = None, info["evaluations_per_image"]
        else:
            ae = self._coarse_task()
            ae.check_input(x, "PHANES coarse stage")
            coarse, _ = ae.reconstruct(x)
            init, n_coarse = coarse, 1
        mask = coarse_mask(residual(x, coarse, sigma), float(c["phanes_mask_percent"]), int(c["phanes_dilate"]))
        ph, info = inpaint(self.net, self.noise_scheduler, x, mask, int(c["phanes_t"]), int(c["phanes_k"]),
                           int(c["r"]), int(c["seed"]), init)
        return ph, {**info, "evaluations_per_image": info["evaluations_per_image"] + n_coarse, "mode": "phanes"}

    # -- scoring -----------------------------------------------------------------------------------
    @torch.no_grad()
    def residuals(self, x: torch.Tensor, mode: str | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """Residual maps (B×H×W, smoothed as configured) of images ``x`` in the model's range; B×S×H×W
        when ``reconstruction.t0`` lists S noise levels."""
        self.eval()
        sigma = float(self.recon_cfg["sigma"])
        levels = t0_levels(self.recon_cfg["t0"]) if "t0" in self.recon_cfg else [None]  # the autoencoder has none
        if str(mode or self.recon_cfg.get("mode")) == "phanes":
            ph, info = self._phanes(x)
            return residual(x, ph, sigma), {**info, "reconstruction": ph}
        if len(levels) == 1:
            rec, info = self.reconstruct(x, mode)
            return residual(x, rec, sigma), {**info, "reconstruction": rec}
        res, recs, infos = [], [], []
        for t0 in levels:
            rec, info = self.reconstruct(x, mode, t0=t0)
            res.append(residual(x, rec, sigma))
            recs.append(rec)
            infos.append(info)
        info = {"t_start": [i["t_start"] for i in infos], "timesteps": [i["timesteps"] for i in infos],
                "evaluations_per_image": sum(i["evaluations_per_image"] for i in infos), "mode": infos[0]["mode"]}
        return torch.stack(res, dim=1), {**info, "reconstruction": recs[-1]}

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, mode: str | None = None, t0: int | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """The reconstruction of ``x`` the residual is taken against (at ``t0``, by default the first
        configured level), and what it cost."""
        c = self.recon_cfg
        t0 = int(t0) if t0 is not None else t0_levels(c["t0"])[0]
        return reconstruct(self.net, self.noise_scheduler, x, t0, int(c["k"]), int(c["r"]),
                           int(c["seed"]), mode or str(c["mode"]))

    def reconstruction_summary(self) -> dict[str, Any]:
        """The reconstruction settings written next to every evaluation."""
        c = self.recon_cfg
        out = {"detector": "ddpm", "t0": c["t0"] if isinstance(c["t0"], list) else int(c["t0"]), "k": int(c["k"]),
               "r": int(c["r"]), "sigma": float(c["sigma"]), "mode": str(c["mode"])}
        if out["mode"] == "phanes":  # (only then: statistics of the other modes stay valid)
            out.update({k: c[k] for k in PHANES_KEYS})
        return out

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
    def use_evaluation_reconstruction(self, evaluation: Any) -> None:
        """Apply ``evaluation.reconstruction`` (e.g. ``mode: ancestral`` on a subset, another K, or several
        t0) and ``evaluation.scoring`` (e.g. another image score) on top of the run's settings. Either needs
        statistics fitted for them (``refit=true``): :meth:`evaluate_split` checks.

        Raises:
            ValueError: an unknown key, naming it.
        """
        ev = to_plain(evaluation) if evaluation is not None else {}
        sc = {k: v for k, v in dict(ev.get("scoring") or {}).items() if v is not None}
        if sc:
            self.score_cfg = _checked({**self.score_cfg, **sc}, SCORE_DEFAULTS, "evaluation.scoring")
        over = {k: v for k, v in dict(ev.get("reconstruction") or {}).items() if v is not None}
        if over:
            unknown = sorted(set(over) - set(self.recon_defaults))
            if unknown:
                raise ValueError(f"evaluation.reconstruction: unknown key(s) {unknown}; expected {sorted(self.recon_defaults)}")
            before = self.recon_cfg
            self.recon_cfg = {**before, **over}
            try:  # checked before it is kept: a refused setting leaves the run's own
                if "t0" in over:
                    T = int(self.noise_scheduler.config.num_train_timesteps)
                    self.recon_cfg["t0"] = _t0_list(over["t0"], T, "evaluation.reconstruction.t0")
                if hasattr(self, "noise_scheduler"):
                    self._check_mode("evaluation.reconstruction")
            except ValueError:
                self.recon_cfg = before
                raise
            if any(k in over for k in PHANES_KEYS):
                self._coarse = None

    def post_fit(self, datamodule: Any, run_dir: Path, evaluation: Any = None) -> dict[str, Any]:
        """Residual statistics and thresholds of clean real images of the calibration split (val when
        there is none), written to ``anomaly_stats.pt`` with the reconstruction settings they hold for."""
        self.use_evaluation_reconstruction(evaluation)
        split = "cal" if datamodule.has_split("cal") else "val"
        res, emb = self._split_residuals(datamodule, split)
        s = self.score_cfg
        # the thresholds from clean images held out from the per-pixel statistics (out of sample for them)
        frac = float(s["threshold_fraction"])
        order = np.random.default_rng(int(self.recon_cfg.get("seed", 0))).permutation(len(res))
        n_thr = int(round(frac * len(res)))
        held = torch.from_numpy(order[:n_thr]) if n_thr else None
        fit_idx = torch.from_numpy(order[n_thr:]) if n_thr else torch.arange(len(res))
        self.stats = AnomalyStats.fit(res[fit_idx], min_images=int(s["min_clean_images"]),
                                      threshold_residuals=res[held] if held is not None else None,
                                      top_k_percent=float(s["top_k_percent"]),
                                      sigma=float(self.recon_cfg["sigma"]), eps=float(s["eps"]),
                                      max_flag_rate=float(s["max_flag_rate"]),
                                      pixel_percentile=float(s["pixel_percentile"]), fitted_on=split,
                                      image_score=str(s["image_score"]), excess_z=float(s["excess_z"]))
        self.stats.reconstruction = self.reconstruction_summary()
        self.stats.fit_reference(emb, int(s["knn_k"]))
        path = Path(run_dir) / STATS_FILE
        if not path.exists():
            self.stats.save(path)
        return self._stats_summary(self.stats)

    @staticmethod
    def _stats_summary(stats: AnomalyStats) -> dict[str, Any]:
        return {"fitted_on": stats.fitted_on, "n_images": stats.n_images, "n_threshold_images": stats.n_threshold_images,
                "thresholds_in_sample": stats.thresholds_in_sample, "image_threshold": stats.image_threshold,
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

        self.use_evaluation_reconstruction(evaluation)
        stats = self._stats_for(fitted)
        if stats.reconstruction and stats.reconstruction != self.reconstruction_summary():
            raise ValueError(f"the residual statistics (anomaly_stats.pt) were fitted with reconstruction "
                             f"{stats.reconstruction}; this evaluation reconstructs with {self.reconstruction_summary()}: "
                             "pass refit=true to fit them again with these settings (into the evaluation folder)")
        s = self.score_cfg
        want = {"image_score": str(s["image_score"]), "excess_z": float(s["excess_z"]),
                "top_k_percent": float(s["top_k_percent"])}
        have = {"image_score": stats.image_score, "excess_z": float(stats.excess_z),
                "top_k_percent": float(stats.top_k_percent)}
        if want != have:
            raise ValueError(f"the residual statistics (anomaly_stats.pt) were fitted for scoring {have}; this evaluation "
                             f"scores with {want}: pass refit=true to fit them (and their thresholds) again")
        return evaluate_anomaly(self, datamodule, split, Path(out_dir), evaluation, extra, stats)

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
        return output.flatten(1).pow(2).mean(1)  # the reconstruction error: large where the image is unreal

    def explain_images(self, datamodule: Any, split: str, n: int, seed: int = 0,
                       evaluation: Any = None) -> dict[str, Any] | None:
        """``n`` injected images of the artifact benchmark built from ``split`` (the evaluation's
        ``artifacts`` settings), taken in turn from each cohort, with their exact masks: explain.py's
        localisation metrics are then against the artifact masks."""
        from medtrust.data.artifacts import ArtifactSpec
        from medtrust.evaluation.anomaly import _normalise, split_benchmark

        ev = to_plain(evaluation) if evaluation is not None else {}
        spec = ArtifactSpec.from_config(ev.get("artifacts"), "evaluation.artifacts")
        rows = [r for r in split_benchmark(datamodule, split, spec) if r["label"] == 1]
        by: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            by.setdefault(r["cohort"], []).append(r)
        rng = np.random.default_rng(seed)
        queues = {c: [v[i] for i in rng.permutation(len(v))] for c, v in by.items()}
        chosen: list[dict[str, Any]] = []
        while len(chosen) < n and any(queues.values()):
            for c in list(queues):
                if queues[c] and len(chosen) < n:
                    chosen.append(queues[c].pop())
        x = torch.stack([_normalise(r["image"], datamodule.normalize) for r in chosen])
        self.check_input(x, f"explanation images of {split}")
        return {"images": x, "masks": torch.stack([torch.from_numpy(r["mask"]).float()[None] for r in chosen]),
                "labels": None, "raw": [r["image"] for r in chosen], "ids": [r["id"] for r in chosen]}

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
        return mid_embedding(self.net, self.noise_scheduler, x, t0_levels(self.recon_cfg["t0"])[0],
                             int(self.recon_cfg["seed"]))


AE_RECON_DEFAULTS = {"sigma": 1.0}


class AutoencoderAnomalyTask(AnomalyTask):
    """The reconstruction baseline of SAFEGEN's comparison: a convolutional autoencoder (MONAI
    ``AutoEncoder`` with a narrow bottleneck, ``medtrust.nets.anomaly.conv_autoencoder``) trained on the
    same real images to reconstruct them (``loss``: L1 or MSE), scored exactly as the DDPM: the residual
    |x − AE(x)|, z-scored per pixel against clean real images, top-k % mean, the same thresholds, the
    same benchmark and report. The contrastive score uses the bottleneck code.

    ``forward(x)`` is the residual ``x − AE(x)`` (its mean square, the ``anomaly_score`` XAI target, is the
    reconstruction error).
    """

    recon_defaults: ClassVar[dict[str, Any]] = AE_RECON_DEFAULTS

    def __init__(self, net: nn.Module, loss: nn.Module, optimizer: Any, scheduler: Any = None,
                 scheduler_interval: str = "step", reconstruction: Mapping[str, Any] | None = None,
                 scoring: Mapping[str, Any] | None = None, monitor: str = "val/anomaly/loss",
                 monitor_mode: str = "min", init_from: str | None = None) -> None:
        TaskBase.__init__(self)
        self.save_hyperparameters(ignore=["net", "loss", "optimizer", "scheduler"])
        self.net, self.loss = net, loss
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.scheduler_interval, self.monitor = scheduler_interval, monitor
        self.recon_cfg = _checked(reconstruction, self.recon_defaults, "model.reconstruction")
        self.score_cfg = _checked(scoring, SCORE_DEFAULTS, "model.scoring")
        self.stats = None
        self.init_report = load_init_weights(self, init_from) if init_from else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.net(x)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x = batch["image"]
        loss = self.loss(self.net(x), x)
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=len(x), prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x = batch["image"]
        loss = self.loss(self.net(x), x)
        self.log("val/loss", loss, on_epoch=True, batch_size=len(x), prog_bar=True)
        self.log("val/anomaly/loss", loss, on_epoch=True, batch_size=len(x))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, mode: str | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        self.eval()
        return self.net(x), {"evaluations_per_image": 1, "mode": "autoencoder"}

    def check_input(self, x: torch.Tensor, where: str) -> None:
        ch = int(self.net.in_channels)
        size = tuple(self.stats.mean.shape) if self.stats is not None else None
        if x.shape[1] != ch or (size is not None and tuple(x.shape[-2:]) != size):
            raise ValueError(f"{where}: images of {x.shape[1]} channel(s) at {tuple(x.shape[-2:])}, the detector was "
                             f"trained on {ch} channel(s){f' and fitted at {size}' if size else ''} (set data.image_size "
                             "/ data.channels, or data.resize to resize)")

    def reconstruction_summary(self) -> dict[str, Any]:
        return {"detector": "autoencoder", "sigma": float(self.recon_cfg["sigma"]), "mode": "autoencoder"}

    @torch.no_grad()
    def embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """The bottleneck code, flattened (the contrastive score's features)."""
        self.eval()
        return self.net.intermediate(self.net.encode(x)).flatten(1)
