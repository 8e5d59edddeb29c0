"""Calibration: expected calibration error (ECE), maximum calibration error, Brier score and
reliability-diagram bins, computed from binned sums so memory is O(bins) however many pixels or
images are seen (torchmetrics' ``CalibrationError`` keeps every prediction, which does not scale
to pixel-level calibration; the tests check both give the same ECE).

Binary convention (torchmetrics-compatible): the confidence is the predicted probability of the
positive class and the "accuracy" is the positive label, i.e. the reliability diagram plots the
observed frequency of positives against the predicted probability. Bins are
``torch.linspace(0, 1, n_bins + 1)`` with right-closed bucketing as torchmetrics does.
"""
from __future__ import annotations

import torch
from torchmetrics import Metric


def calibration_bins(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Bin sums: returns (3, n_bins + 1) = [count, sum of confidence, sum of correct] per bin."""
    conf = confidence.detach().reshape(-1).double()
    acc = correct.detach().reshape(-1).double()
    bounds = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64, device=conf.device)
    idx = torch.bucketize(conf, bounds, right=True) - 1
    out = torch.zeros(3, n_bins + 1, dtype=torch.float64, device=conf.device)
    out[0].scatter_add_(0, idx, torch.ones_like(conf))
    out[1].scatter_add_(0, idx, conf)
    out[2].scatter_add_(0, idx, acc)
    return out


def ece_from_bins(bins: torch.Tensor) -> dict[str, float]:
    """ECE (L1, weighted by bin mass) and MCE from :func:`calibration_bins` sums."""
    count, conf_sum, acc_sum = bins
    n = count.sum().clamp_min(1)
    nz = count > 0
    gap = (conf_sum[nz] / count[nz] - acc_sum[nz] / count[nz]).abs()
    return {"ece": float((gap * count[nz] / n).sum()), "mce": float(gap.max()) if nz.any() else 0.0}


def reliability_from_bins(bins: torch.Tensor) -> dict[str, list[float]]:
    """Per-bin mean confidence, observed frequency and count (empty bins give NaN)."""
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

    Args:
        n_bins: number of equal-width confidence bins.
    """

    full_state_update = False

    def __init__(self, n_bins: int = 15) -> None:
        super().__init__()
        if n_bins < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        self.n_bins = n_bins
        self.add_state("bins", default=torch.zeros(3, n_bins + 1, dtype=torch.float64), dist_reduce_fx="sum")
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
