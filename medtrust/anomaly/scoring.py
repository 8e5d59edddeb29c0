"""Residual scoring against clean real images (SAFEGEN).

The residual |x − x̂| of an image (optionally smoothed) is z-scored **per pixel** against the residual
statistics of clean real validation images: :class:`AnomalyStats`, saved as ``anomaly_stats.pt`` (mean
and std maps, the image-score and pixel-z percentiles of the clean images, and how many there were). The
image score is the mean of the top-k % z-residuals (``top_k``), or the excess mass above a z level
(``excess``: the mean over pixels of max(z − excess_z, 0), which grows with the strength *and* the extent
of an anomaly, so it orders severities where the top-k mean saturates). Thresholds come from clean real images: a
percentile, or the smallest threshold that flags at most a given share of them; a threshold from fewer
clean images than ``min_images`` is refused.

Several noise levels (t₀ scales): residuals of shape N×S×H×W give statistics of shape S×H×W; each scale is
z-scored against its own statistics and the z-maps are fused per pixel by their maximum (a pixel is as
anomalous as at the scale where it is most unlike clean images). Small t₀ sees edges and fine texture, a
large one also erases and so finds large homogeneous regions that a small t₀ reconstructs faithfully.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from medtrust.utils.io import atomic_write_bytes, load_tensors

PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9)


class TooFewImagesError(ValueError):
    """A threshold or statistic asked of fewer clean images than configured."""


def residual(x: torch.Tensor, recon: torch.Tensor, sigma: float = 0.0) -> torch.Tensor:
    """|x − x̂| averaged over channels (B×H×W), Gaussian-smoothed with ``sigma`` pixels if > 0.

    Raises:
        ValueError: NaN or Inf in the residual (naming how many images hold them).
    """
    r = (x - recon).abs().mean(dim=1)
    bad = ~torch.isfinite(r).flatten(1).all(dim=1)
    if bad.any():
        raise ValueError(f"NaN or Inf residuals in {int(bad.sum())} of {len(r)} images (images {bad.nonzero().flatten().tolist()[:10]} "
                         "of the batch): check the input values and the model's output")
    if sigma > 0:
        r = torch.from_numpy(np.stack([gaussian_filter(a, sigma) for a in r.cpu().numpy()])).to(r)
    return r


def top_k_mean(z: torch.Tensor, top_k_percent: float) -> torch.Tensor:
    """Per image (B×H×W), the mean of its top ``top_k_percent`` % values (at least one pixel)."""
    if not 0 < top_k_percent <= 100:
        raise ValueError(f"top_k_percent={top_k_percent}: expected 0 < top_k <= 100")
    flat = z.flatten(1)
    k = max(1, int(math.ceil(flat.shape[1] * top_k_percent / 100)))
    return flat.topk(k, dim=1).values.mean(dim=1)


IMAGE_SCORES = ("top_k", "excess")


def excess_mass(z: torch.Tensor, excess_z: float) -> torch.Tensor:
    """Per image (B×H×W), the mean over pixels of ``max(z − excess_z, 0)``: how much z-residual lies above
    what clean pixels reach, growing with both the strength and the extent of an anomaly."""
    return (z - float(excess_z)).clamp(min=0).flatten(1).mean(dim=1)


def threshold_at_flag_rate(scores: np.ndarray | torch.Tensor, max_flag_rate: float, min_images: int,
                           what: str = "image scores") -> float:
    """The smallest threshold that flags (score > threshold) at most ``max_flag_rate`` of clean ``scores``.

    Raises:
        TooFewImagesError: fewer than ``min_images`` scores.
    """
    s = np.sort(np.asarray(scores, dtype=float).ravel())
    if len(s) < min_images:
        raise TooFewImagesError(f"a threshold from {len(s)} clean {what}: at least {min_images} are needed "
                                "(evaluation.min_clean_images)")
    if not 0 <= max_flag_rate < 1:
        raise ValueError(f"max_flag_rate={max_flag_rate}: expected 0 <= rate < 1")
    allowed = int(math.floor(max_flag_rate * len(s)))  # images that may lie above the threshold
    return float(s[len(s) - 1 - allowed])


@dataclass
class AnomalyStats:
    """Per-pixel residual statistics of clean real images, and the thresholds fitted on them."""

    mean: torch.Tensor                    # H×W, or S×H×W for S noise levels (scales)
    std: torch.Tensor                     # H×W, or S×H×W
    n_images: int
    top_k_percent: float
    sigma: float = 0.0
    eps: float = 1e-3
    score_percentiles: dict[str, float] = field(default_factory=dict)
    pixel_percentiles: dict[str, float] = field(default_factory=dict)
    image_threshold: float | None = None
    pixel_threshold: float | None = None
    fitted_on: str = ""
    score_mean: float | None = None       # of the clean images' image scores (fusion)
    score_std: float | None = None
    reference: torch.Tensor | None = None  # the contrastive score's reference embeddings (N×D) ...
    knn_k: int = 5
    knn_mean: float | None = None          # ... and the leave-one-out k-NN distances of the references
    knn_std: float | None = None
    reconstruction: dict[str, Any] = field(default_factory=dict)  # the settings the residuals were made with
    global_mean: float | list[float] | None = None  # one mean and std over every pixel of the clean residuals (per
    global_std: float | list[float] | None = None   # scale): the "raw" baseline scores without the per-pixel statistics
    n_threshold_images: int | None = None  # the clean images the thresholds were fitted on ...
    thresholds_in_sample: bool = True      # ... and whether they are the statistics' own images
    image_score: str = "top_k"             # top_k: mean of the top-k % z-residuals; excess: excess_mass above excess_z
    excess_z: float = 4.0

    @classmethod
    def fit(cls, residuals: torch.Tensor, min_images: int, top_k_percent: float = 1.0, sigma: float = 0.0,
            eps: float = 1e-3, max_flag_rate: float = 0.05, pixel_percentile: float = 99.0,
            fitted_on: str = "", image_score: str = "top_k", excess_z: float = 4.0,
            threshold_residuals: torch.Tensor | None = None) -> "AnomalyStats":
        """Fit the per-pixel statistics on the residuals (N×H×W, or N×S×H×W for S scales) of clean real images, and the thresholds
        on ``threshold_residuals`` (other clean real images) when given: the image threshold flags at most
        ``max_flag_rate`` of them, the pixel threshold is their z-residuals' ``pixel_percentile``.

        Thresholds fitted on the images the statistics were fitted on are in-sample: those images' own
        mean and std make their z-scores small, so the threshold is too low for new images (on phantom
        CXRs a "5 %" threshold fitted that way flagged 15 % of clean test images). Pass held-out clean
        images as ``threshold_residuals`` (:meth:`AnomalyTask.post_fit` splits the calibration images).

        Raises:
            TooFewImagesError: fewer than ``min_images`` residual maps for the statistics or the thresholds.
        """
        n = int(residuals.shape[0])
        if n < min_images:
            raise TooFewImagesError(f"residual statistics from {n} clean real images: at least {min_images} are "
                                    "needed (evaluation.min_clean_images)")
        if image_score not in IMAGE_SCORES:
            raise ValueError(f"model.scoring.image_score={image_score!r}: expected one of {list(IMAGE_SCORES)}")
        if residuals.ndim not in (3, 4):
            raise ValueError(f"residuals of shape {tuple(residuals.shape)}: expected N×H×W or N×S×H×W (S scales)")
        res = residuals.double()
        if res.ndim == 4:  # one global mean and std per scale
            flat = res.transpose(0, 1).flatten(1)
            gm, gs = flat.mean(1).tolist(), flat.std(1).tolist()
        else:
            gm, gs = float(res.mean()), float(res.std())
        stats = cls(mean=res.mean(0).float(), std=res.std(0).float(), n_images=n, top_k_percent=float(top_k_percent),
                    sigma=float(sigma), eps=float(eps), fitted_on=fitted_on, image_score=image_score,
                    excess_z=float(excess_z), global_mean=gm, global_std=gs)
        held = residuals if threshold_residuals is None else threshold_residuals
        stats.n_threshold_images = int(held.shape[0])
        stats.thresholds_in_sample = threshold_residuals is None
        z = stats.zscore(held)
        scores = stats.image_scores(held).numpy()
        stats.score_percentiles = {f"p{p:g}": float(np.percentile(scores, p)) for p in PERCENTILES}
        pix = z.flatten().numpy()
        stats.pixel_percentiles = {f"p{p:g}": float(np.percentile(pix, p)) for p in PERCENTILES}
        stats.score_mean, stats.score_std = float(scores.mean()), float(scores.std())
        stats.image_threshold = threshold_at_flag_rate(scores, max_flag_rate, min_images)
        stats.pixel_threshold = float(np.percentile(pix, pixel_percentile))
        return stats

    def fit_reference(self, embeddings: torch.Tensor, k: int = 5) -> None:
        """The contrastive score's reference: embeddings of clean real images, and the mean and std of
        each one's distance to its ``k`` nearest *other* references (leave one out)."""
        n = int(embeddings.shape[0])
        if n <= k:
            raise TooFewImagesError(f"a {k}-NN reference from {n} clean real images: at least {k + 1} are needed")
        self.reference, self.knn_k = embeddings.detach().float().cpu(), int(k)
        d = torch.cdist(self.reference, self.reference)
        d.fill_diagonal_(float("inf"))
        loo = d.topk(k, dim=1, largest=False).values.mean(1)
        self.knn_mean, self.knn_std = float(loo.mean()), float(loo.std())

    def knn_scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Mean distance of each embedding to its k nearest references (the contrastive score)."""
        if self.reference is None:
            raise ValueError("no reference embeddings: fit_reference first")
        d = torch.cdist(embeddings.detach().float().cpu(), self.reference)
        return d.topk(min(self.knn_k, len(self.reference)), dim=1, largest=False).values.mean(1)

    def fused(self, image_scores: torch.Tensor, knn_scores: torch.Tensor) -> torch.Tensor:
        """The residual and the contrastive score, each standardised on the clean images, summed."""
        if None in (self.score_mean, self.score_std, self.knn_mean, self.knn_std):
            raise ValueError("fusion needs the clean images' score statistics and a k-NN reference")
        a = (image_scores - self.score_mean) / max(self.score_std, 1e-12)
        b = (knn_scores - self.knn_mean) / max(self.knn_std, 1e-12)
        return a + b

    @property
    def n_scales(self) -> int:
        """Noise levels the statistics hold (1 for H×W statistics)."""
        return int(self.mean.shape[0]) if self.mean.ndim == 3 else 1

    def _check_shape(self, residuals: torch.Tensor) -> None:
        want = tuple(self.mean.shape)
        got = tuple(residuals.shape[1:])
        if got != want:
            what = f"{self.n_scales} scale(s) × {tuple(want[-2:])}" if self.mean.ndim == 3 else f"{want}"
            raise ValueError(f"residual maps of shape {got}, the statistics are {what} (the size and noise levels "
                             "the detector was fitted with)")

    def zscore(self, residuals: torch.Tensor) -> torch.Tensor:
        """z-residual maps (N×H×W); with several scales, each scale against its own statistics, fused by
        the per-pixel maximum."""
        self._check_shape(residuals)
        z = (residuals - self.mean) / (self.std + self.eps)
        return z.amax(dim=1) if self.mean.ndim == 3 else z

    def raw_scores(self, residuals: torch.Tensor) -> torch.Tensor:
        """The same image score of residuals standardised by one global mean and std (no per-pixel
        statistics): the raw-residual baseline. With ``top_k`` it ranks images as the top-k % raw residual."""
        if self.global_mean is None or self.global_std is None:
            raise ValueError("no global residual statistics (a statistics file of an older version): refit")
        self._check_shape(residuals)
        if self.mean.ndim == 3:
            gm = torch.tensor(self.global_mean, dtype=residuals.dtype).view(1, -1, 1, 1)
            gs = torch.tensor(self.global_std, dtype=residuals.dtype).view(1, -1, 1, 1)
            return self._score(((residuals - gm) / (gs + self.eps)).amax(dim=1))
        return self._score((residuals - self.global_mean) / (self.global_std + self.eps))

    def _score(self, z: torch.Tensor) -> torch.Tensor:
        return excess_mass(z, self.excess_z) if self.image_score == "excess" else top_k_mean(z, self.top_k_percent)

    def image_scores(self, residuals: torch.Tensor) -> torch.Tensor:
        return self._score(self.zscore(residuals))

    # -- a named, saved component: tensors and plain values only (loaded with weights_only=True) --
    def state(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "n_images": self.n_images, "top_k_percent": self.top_k_percent,
                "sigma": self.sigma, "eps": self.eps, "score_percentiles": self.score_percentiles,
                "pixel_percentiles": self.pixel_percentiles, "image_threshold": self.image_threshold,
                "pixel_threshold": self.pixel_threshold, "fitted_on": self.fitted_on, "score_mean": self.score_mean,
                "score_std": self.score_std, "reference": self.reference, "knn_k": self.knn_k, "knn_mean": self.knn_mean,
                "knn_std": self.knn_std, "reconstruction": dict(self.reconstruction), "image_score": self.image_score,
                "excess_z": self.excess_z, "global_mean": self.global_mean, "global_std": self.global_std,
                "n_threshold_images": self.n_threshold_images, "thresholds_in_sample": self.thresholds_in_sample}

    def save(self, path: str | Path) -> Path:
        """Write atomically; an existing file is never replaced."""
        import io

        path = Path(path)
        if path.exists():
            raise FileExistsError(f"{path} exists; anomaly statistics are never overwritten")
        buf = io.BytesIO()
        torch.save(self.state(), buf)
        atomic_write_bytes(path, buf.getvalue())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "AnomalyStats":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (the anomaly run's statistics of clean real images)")
        state = load_tensors(path, "anomaly_stats.pt")
        missing = {"mean", "std", "n_images", "top_k_percent"} - set(state)
        if missing:
            raise ValueError(f"{path}: missing {sorted(missing)}")
        return cls(**state)
