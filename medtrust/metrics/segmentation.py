"""Segmentation metrics: per-image Dice/IoU, pixel confusion counts and threshold sweeps.

Conventions (the same in callbacks, ``evaluate.py`` and tests):
- ``dice`` and ``iou`` are means over images of the per-image scores (ISIC convention); an image
  with an empty mask and an empty prediction scores 1.
- ``precision``, ``recall``, ``accuracy``, ``f1`` come from the pixel confusion matrix pooled over
  all images (so ``f1`` is the pooled Dice).
- ``fp_rate`` and ``fn_rate`` are false-positive / false-negative pixels as a fraction of all
  pixels (the figures GlassBox quotes, e.g. "~2.5 % of test pixels are false positives").
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

METRIC_NAMES = ("dice", "iou", "precision", "recall", "accuracy", "f1", "fp_rate", "fn_rate")


def compute_confusion(probs: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Per-image pixel confusion counts.

    Args:
        probs: B×1×H×W (or B×H×W) probabilities in [0, 1].
        target: same shape, {0, 1}.
        threshold: probability at or above which a pixel is predicted positive.

    Returns:
        Long tensor B×4 of ``[tp, fp, tn, fn]`` per image.
    """
    if probs.shape != target.shape:
        raise ValueError(f"probs shape {tuple(probs.shape)} != target shape {tuple(target.shape)}")
    # Counted directly: torchmetrics' samplewise ``binary_stat_scores`` squeezes away the batch axis
    # when B = 1 (IndexError), which a last batch of one image triggers.
    pred = probs.reshape(probs.shape[0], -1) >= threshold
    t = target.reshape(target.shape[0], -1) > 0.5
    tp = (pred & t).sum(1)
    fp = (pred & ~t).sum(1)
    fn = (~pred & t).sum(1)
    tn = t.shape[1] - tp - fp - fn
    return torch.stack([tp, fp, tn, fn], 1).long()


def per_image_scores(confusion: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image Dice, IoU, precision and recall from B×4 ``[tp, fp, tn, fn]`` counts."""
    tp, fp, tn, fn = confusion.double().unbind(-1)
    union = tp + fp + fn
    empty = union == 0
    dice = torch.where(empty, torch.ones_like(tp), 2 * tp / (2 * tp + fp + fn).clamp_min(1))
    iou = torch.where(empty, torch.ones_like(tp), tp / union.clamp_min(1))
    precision = torch.where(tp + fp == 0, (fn == 0).double(), tp / (tp + fp).clamp_min(1))
    recall = torch.where(tp + fn == 0, torch.ones_like(tp), tp / (tp + fn).clamp_min(1))
    return {"dice": dice, "iou": iou, "precision": precision, "recall": recall}


def compute_segmentation_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """Summary metrics from per-image confusion counts (see module docstring for definitions).

    Args:
        confusion: B×4 ``[tp, fp, tn, fn]`` per image.

    Returns:
        Dict with :data:`METRIC_NAMES` plus pooled ``tp``, ``fp``, ``tn``, ``fn`` and ``n_images``.
    """
    per = per_image_scores(confusion)
    tp, fp, tn, fn = (float(v) for v in confusion.double().sum(0))
    total = tp + fp + tn + fn
    return {
        "dice": float(per["dice"].mean()), "iou": float(per["iou"].mean()),
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "accuracy": (tp + tn) / total if total else 0.0,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0,
        "fp_rate": fp / total if total else 0.0,
        "fn_rate": fn / total if total else 0.0,
        "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n_images": int(confusion.shape[0]),
    }


def threshold_sweep(probs: torch.Tensor, target: torch.Tensor, thresholds: Sequence[float]) -> list[dict[str, float]]:
    """Summary metrics at each probability threshold (one row per threshold)."""
    rows = []
    for thr in thresholds:
        m = compute_segmentation_metrics(compute_confusion(probs, target, float(thr)))
        rows.append({"threshold": float(thr), **{k: m[k] for k in METRIC_NAMES}})
    return rows


class SegmentationMetric(Metric):
    """Accumulates per-image Dice/IoU sums and pooled pixel counts; ``compute`` returns the dict of
    :func:`compute_segmentation_metrics` (DDP-safe: every state is a summed tensor)."""

    full_state_update = False

    def __init__(self, threshold: float = 0.5) -> None:
        super().__init__()
        self.threshold = threshold
        for name in ("dice_sum", "iou_sum", "n_images", "tp", "fp", "tn", "fn"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        conf = compute_confusion(probs.detach(), target, self.threshold)
        per = per_image_scores(conf)
        self.dice_sum += per["dice"].sum()
        self.iou_sum += per["iou"].sum()
        self.n_images += conf.shape[0]
        tp, fp, tn, fn = conf.double().sum(0)
        self.tp += tp
        self.fp += fp
        self.tn += tn
        self.fn += fn

    def compute(self) -> dict[str, torch.Tensor]:
        tp, fp, tn, fn = self.tp, self.fp, self.tn, self.fn
        total = (tp + fp + tn + fn).clamp_min(1)
        n = self.n_images.clamp_min(1)
        return {
            "dice": self.dice_sum / n, "iou": self.iou_sum / n,
            "precision": tp / (tp + fp).clamp_min(1), "recall": tp / (tp + fn).clamp_min(1),
            "accuracy": (tp + tn) / total, "f1": 2 * tp / (2 * tp + fp + fn).clamp_min(1),
            "fp_rate": fp / total, "fn_rate": fn / total,
        }
