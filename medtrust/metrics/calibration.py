"""Calibration: expected calibration error (ECE), maximum calibration error, Brier score and
reliability-diagram bins, computed from binned sums so memory is O(bins) however many pixels or
images are seen (torchmetrics' ``CalibrationError`` keeps every prediction, which does not scale
to pixel-level calibration; the tests check both give the same ECE).

Binary convention (torchmetrics-compatible): the confidence is the predicted probability of the
positive class and the "accuracy" is the positive label, i.e. the reliability diagram plots the
observed frequency of positives against the predicted probability.

Bins: exactly ``n_bins`` equal-width bins with edges ``torch.linspace(0, 1, n_bins + 1)``; bin ``i``
is ``[edge_i, edge_{i+1})`` and the last bin is closed, ``[edge_{n-1}, 1]``, so a confidence of
exactly 1.0 falls in the last bin. torchmetrics buckets the same way except that it puts 1.0 in an
extra (n + 1)-th bin, so the ECE equals torchmetrics' whenever no confidence is exactly 1.0.
"""
from __future__ import annotations

import torch
from torchmetrics import Metric


def calibration_bins(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Per-bin sums over ``n_bins`` equal-width confidence bins (see the module docstring).

    Args:
        confidence: confidences in [0, 1], any shape.
        correct: same number of elements; 1 where correct (binary: the positive label), else 0.
        n_bins: number of bins (>= 1).

    Returns:
        float64 tensor (3, n_bins): ``[count, sum of confidence, sum of correct]`` per bin. Sums of
        these over images, batches or ranks are again valid bins.

    Raises:
        ValueError: if ``n_bins < 1``, the sizes differ, or a confidence is outside [0, 1] (beyond a
            rounding tolerance of 1e-6) or NaN.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if confidence.numel() != correct.numel():
        raise ValueError(f"confidence has {confidence.numel()} elements but correct has {correct.numel()}")
    raw = confidence.detach().reshape(-1).contiguous()  # bucketize copies strided input with a warning
    if not raw.is_floating_point():
        raw = raw.to(torch.get_default_dtype())
    tol = 1e-6  # averaged probabilities (MC passes, ensemble members) may round a hair past [0, 1]
    if raw.numel() and not bool(((raw >= -tol) & (raw <= 1 + tol)).all()):
        raise ValueError("confidence must be in [0, 1] (no NaN); got values outside")
    raw = raw.clamp(0, 1)
    # Edges in the input's dtype, as torchmetrics builds them, so values on an edge bin alike.
    edges = torch.linspace(0, 1, n_bins + 1, dtype=raw.dtype, device=raw.device)
    idx = (torch.bucketize(raw, edges, right=True) - 1).clamp_max_(n_bins - 1)  # 1.0 -> last bin
    conf = raw.double()
    out = torch.zeros(3, n_bins, dtype=torch.float64, device=conf.device)
    out[0].scatter_add_(0, idx, torch.ones_like(conf))
    out[1].scatter_add_(0, idx, conf)
    out[2].scatter_add_(0, idx, correct.detach().reshape(-1).to(conf.device, torch.float64))
    return out


def ece_from_bins(bins: torch.Tensor) -> dict[str, float]:
    """ECE (L1, weighted by bin mass) and MCE (largest gap over non-empty bins) from
    :func:`calibration_bins` sums (3, n_bins), or any sum of them."""
    count, conf_sum, acc_sum = bins
    n = count.sum().clamp_min(1)
    nz = count > 0
    gap = (conf_sum[nz] / count[nz] - acc_sum[nz] / count[nz]).abs()
    return {"ece": float((gap * count[nz] / n).sum()), "mce": float(gap.max()) if nz.any() else 0.0}


def reliability_from_bins(bins: torch.Tensor) -> dict[str, list[float]]:
    """Per-bin mean confidence, observed frequency and count, each a list of length n_bins (empty
    bins give NaN confidence and frequency), from :func:`calibration_bins` sums (3, n_bins)."""
    count, conf_sum, acc_sum = bins
    c = count.clamp_min(1)
    nan = torch.full_like(count, float("nan"))
    return {
        "confidence": torch.where(count > 0, conf_sum / c, nan).tolist(),
        "frequency": torch.where(count > 0, acc_sum / c, nan).tolist(),
        "count": count.tolist(),
    }


def compute_binary_ece(probs: torch.Tensor, target: torch.Tensor, n_bins: int = 15) -> float:
    """ECE of positive-class probabilities ``probs`` against {0,1} ``target`` (any shapes)."""
    return ece_from_bins(calibration_bins(probs, target, n_bins))["ece"]


def compute_brier(probs: torch.Tensor, target: torch.Tensor) -> float:
    """Brier score of binary probabilities: mean of (p - y)^2."""
    return float((probs.double() - target.double()).pow(2).mean())


class BinaryCalibrationMetric(Metric):
    """Binned accumulator for binary (or pixel-wise) calibration; DDP-safe summed states.

    States: ``bins`` (3, n_bins) float64 :func:`calibration_bins` sums, ``sq_err`` and ``n`` for
    the Brier score. ``compute`` returns ``{"ece", "mce", "brier"}`` floats and ``reliability``
    lists of length n_bins.

    Args:
        n_bins: number of equal-width confidence bins (the last one closed at 1.0).
    """

    full_state_update = False

    def __init__(self, n_bins: int = 15) -> None:
        super().__init__()
        if n_bins < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        self.n_bins = n_bins
        self.add_state("bins", default=torch.zeros(3, n_bins, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sq_err", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        self.bins += calibration_bins(probs, target, self.n_bins)
        self.sq_err += (probs.detach().double() - target.double()).pow(2).sum()
        self.n += probs.numel()

    def compute(self) -> dict[str, float]:
        out = ece_from_bins(self.bins)
        out["brier"] = float(self.sq_err / self.n.clamp_min(1))
        return out

    def reliability(self) -> dict[str, list[float]]:
        return reliability_from_bins(self.bins)
