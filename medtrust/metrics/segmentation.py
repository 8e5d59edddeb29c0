"""Segmentation metrics: per-image Dice/IoU, pixel confusion counts, threshold sweeps and the
binned pixel precision-recall curve.

Conventions (the same in callbacks, ``evaluate.py`` and tests):
- ``dice`` and ``iou`` are means over images of the per-image scores (ISIC convention).
- ``precision``, ``recall``, ``accuracy``, ``f1`` come from the pixel confusion matrix pooled over
  all images (so ``f1`` is the pooled Dice).
- ``fp_rate`` and ``fn_rate`` are false-positive / false-negative pixels as a fraction of all
  pixels (the figures GlassBox quotes, e.g. "~2.5 % of test pixels are false positives").
- Empty masks, one rule everywhere (:func:`confusion_scores`, used per image, pooled and by
  :class:`SegmentationMetric`): an overlap ratio (Dice, IoU, precision, recall, F1) whose
  denominator is zero is 1.0 when there is nothing to find and nothing was predicted
  (``tp + fp + fn == 0``), else 0.0. So an empty mask with an empty prediction scores 1 on all of
  them; precision with no predicted pixels but missed lesion pixels is 0; recall with no lesion
  pixels but false positives is 0. ``accuracy``, ``fp_rate`` and ``fn_rate`` over zero pixels
  (no images at all) are 0.0.
- The pixel PR curve (:func:`binned_pr_curve`, :class:`BinnedPRMetric`) follows torchmetrics'
  binned ``binary_precision_recall_curve`` instead, value for value, NaN included (see there).
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


def confusion_scores(confusion: torch.Tensor) -> dict[str, torch.Tensor]:
    """All :data:`METRIC_NAMES` from ``[tp, fp, tn, fn]`` counts, with the module's empty-mask rule.

    The one place the zero-denominator convention lives: per-image scores, pooled scores and
    :class:`SegmentationMetric` all call it.

    Args:
        confusion: (..., 4) counts ``[tp, fp, tn, fn]`` (e.g. B×4 per image, or 4 pooled).

    Returns:
        Dict of float64 tensors of shape ``confusion.shape[:-1]``, keyed by :data:`METRIC_NAMES`.
    """
    if confusion.shape[-1:] != (4,):
        raise ValueError(f"confusion must have a last axis of 4 [tp, fp, tn, fn], got shape {tuple(confusion.shape)}")
    tp, fp, tn, fn = confusion.double().unbind(-1)
    nothing = (tp + fp + fn == 0).double()  # nothing to find and nothing predicted

    def overlap(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), nothing)

    def rate(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)

    total = tp + fp + tn + fn
    dice = overlap(2 * tp, 2 * tp + fp + fn)
    return {
        "dice": dice, "iou": overlap(tp, tp + fp + fn),
        "precision": overlap(tp, tp + fp), "recall": overlap(tp, tp + fn),
        "accuracy": rate(tp + tn, total), "f1": dice,
        "fp_rate": rate(fp, total), "fn_rate": rate(fn, total),
    }


def per_image_scores(confusion: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image Dice, IoU, precision and recall (float64, shape B) from B×4 ``[tp, fp, tn, fn]``
    counts, with the module's empty-mask rule (:func:`confusion_scores`)."""
    s = confusion_scores(confusion)
    return {k: s[k] for k in ("dice", "iou", "precision", "recall")}


def compute_segmentation_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """Summary metrics from per-image confusion counts (see module docstring for definitions).

    Args:
        confusion: B×4 ``[tp, fp, tn, fn]`` per image.

    Returns:
        Dict with :data:`METRIC_NAMES` plus pooled ``tp``, ``fp``, ``tn``, ``fn`` and ``n_images``.
    """
    per = per_image_scores(confusion)
    counts = confusion.double().sum(0)
    pooled = confusion_scores(counts)
    tp, fp, tn, fn = (float(v) for v in counts)
    return {
        "dice": float(per["dice"].mean()), "iou": float(per["iou"].mean()),
        **{k: float(pooled[k]) for k in METRIC_NAMES if k not in ("dice", "iou")},
        "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n_images": int(confusion.shape[0]),
    }


def threshold_sweep(probs: torch.Tensor, target: torch.Tensor, thresholds: Sequence[float]) -> list[dict[str, float]]:
    """Summary metrics at each probability threshold (one row per threshold)."""
    rows = []
    for thr in thresholds:
        m = compute_segmentation_metrics(compute_confusion(probs, target, float(thr)))
        rows.append({"threshold": float(thr), **{k: m[k] for k in METRIC_NAMES}})
    return rows


def pr_thresholds(n_thresholds: int = 101, device: torch.device | str | None = None) -> torch.Tensor:
    """``torch.linspace(0, 1, n_thresholds)`` in the default dtype, as torchmetrics' binned mode
    (``thresholds=<int>``) builds them."""
    if n_thresholds < 2:
        raise ValueError(f"n_thresholds must be >= 2, got {n_thresholds}")
    return torch.linspace(0, 1, n_thresholds, device=device)


def pr_histogram(probs: torch.Tensor, target: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Negatives and positives counted by how many thresholds each probability reaches.

    Column ``b`` counts the pixels with exactly ``b`` thresholds ``<= prob``, i.e. predicted positive
    (``prob >= threshold``, as torchmetrics) at thresholds ``0 .. b-1``. One bucketize and one
    bincount: memory O(pixels) for the index vector plus O(thresholds), never pixels × thresholds.

    Args:
        probs: probabilities in [0, 1], any shape.
        target: same shape; a pixel is positive where ``target > 0.5``.
        thresholds: T increasing thresholds (:func:`pr_thresholds`).

    Returns:
        Long tensor 2×(T + 1): row 0 negatives, row 1 positives.

    Raises:
        ValueError: if shapes differ or a probability is outside [0, 1] (or NaN); torchmetrics would
            silently apply a sigmoid there.
    """
    if probs.shape != target.shape:
        raise ValueError(f"probs shape {tuple(probs.shape)} != target shape {tuple(target.shape)}")
    p = probs.detach().reshape(-1)
    if p.numel() and not bool(((p >= 0) & (p <= 1)).all()):
        raise ValueError("probs must be probabilities in [0, 1] (no NaN); got values outside")
    # Compare in the promoted dtype, as torchmetrics' ``preds >= thresholds`` does.
    dtype = torch.promote_types(p.dtype, thresholds.dtype)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    n_reached = torch.searchsorted(thresholds.to(p.device, dtype), p.to(dtype).contiguous(), right=True)  # (N,) in 0..T
    # bincount without weights is deterministic on CPU and CUDA (no use_deterministic_algorithms error).
    code = n_reached.mul_(2).add_(target.detach().reshape(-1) > 0.5)
    t = thresholds.numel()
    return torch.bincount(code, minlength=2 * (t + 1)).reshape(t + 1, 2).T.contiguous()


def pr_curve_from_histogram(hist: torch.Tensor, thresholds: torch.Tensor) -> dict[str, torch.Tensor]:
    """Precision, recall and average precision from a :func:`pr_histogram` (cumulative sums from
    the top: ``tp[j]`` is the positives that reach threshold ``j``).

    Returns:
        Same dict as :func:`binned_pr_curve`.
    """
    t = thresholds.numel()
    if hist.shape != (2, t + 1):
        raise ValueError(f"hist must have shape (2, {t + 1}) for {t} thresholds, got {tuple(hist.shape)}")
    # reached[:, j] = pixels with at least j + 1 thresholds <= prob = predicted positive at threshold j.
    reached = hist.flip(1).cumsum(1).flip(1)[:, 1:].double()  # (2, T)
    fp, tp = reached
    n_pos = hist[1].sum().double()
    fn = n_pos - tp
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=hist.device)
    # torchmetrics' binned mode: 0 / 0 -> NaN (zero_division="nan").
    precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp_min(1), nan)
    recall = torch.where(tp + fn > 0, tp / (tp + fn).clamp_min(1), nan)
    precision = torch.cat([precision, precision.new_ones(1)])
    recall = torch.cat([recall, recall.new_zeros(1)])
    # torchmetrics' binary_average_precision: NaN -> 0, then -sum(diff(recall) * precision[:-1]).
    p0, r0 = precision.nan_to_num(0.0), recall.nan_to_num(0.0)
    ap = -((r0[1:] - r0[:-1]) * p0[:-1]).sum()
    return {"precision": precision, "recall": recall, "thresholds": thresholds, "average_precision": ap}


def binned_pr_curve(probs: torch.Tensor, target: torch.Tensor, n_thresholds: int = 101) -> dict[str, torch.Tensor]:
    """Pixel precision-recall curve and average precision at ``n_thresholds`` fixed thresholds.

    Equal to torchmetrics' ``binary_precision_recall_curve(probs, target, thresholds=n_thresholds)``
    and ``binary_average_precision(..., thresholds=n_thresholds)``, but from an O(n_thresholds)
    histogram (:func:`pr_histogram`): torchmetrics' vectorised path (≤ 50,000 elements) allocates
    pixels × thresholds tensors, and under ``torch.use_deterministic_algorithms`` its bincount
    fallback allocates pixels × 4·thresholds int64 (15 GB for 46 images of 32×32).

    Args:
        probs: probabilities in [0, 1], any shape (e.g. N×1×H×W).
        target: same shape; positive where ``target > 0.5``.
        n_thresholds: T, the number of thresholds ``linspace(0, 1, T)`` (>= 2).

    Returns:
        Dict, torchmetrics' layout:

        - ``precision``: float64 (T + 1,); entry ``j < T`` at ``thresholds[j]`` (a pixel is positive
          when ``prob >= thresholds[j]``), NaN where nothing is predicted positive; last entry 1.
        - ``recall``: float64 (T + 1,); NaN everywhere but the last entry when there are no
          positive pixels; last entry 0.
        - ``thresholds``: (T,) ``linspace(0, 1, T)`` in the default dtype.
        - ``average_precision``: float64 scalar, ``-sum(diff(recall) * precision[:-1])`` with NaN
          read as 0 (so 0 when there are no positives).

    Raises:
        ValueError: if shapes differ, a probability is outside [0, 1], or ``n_thresholds < 2``.
    """
    thresholds = pr_thresholds(n_thresholds, probs.device)
    return pr_curve_from_histogram(pr_histogram(probs, target, thresholds), thresholds)


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
        pooled = confusion_scores(torch.stack([self.tp, self.fp, self.tn, self.fn]))
        n = self.n_images.clamp_min(1)
        return {"dice": self.dice_sum / n, "iou": self.iou_sum / n,
                **{k: pooled[k] for k in METRIC_NAMES if k not in ("dice", "iou")}}


class BinnedPRMetric(Metric):
    """Streams :func:`binned_pr_curve`: accumulates the 2×(T + 1) :func:`pr_histogram` (a summed
    long state, DDP-safe); ``compute`` returns the same dict as :func:`binned_pr_curve`.

    Args:
        n_thresholds: T, the number of thresholds ``linspace(0, 1, T)`` (>= 2).
    """

    full_state_update = False

    def __init__(self, n_thresholds: int = 101) -> None:
        super().__init__()
        self.n_thresholds = n_thresholds
        self.register_buffer("thresholds", pr_thresholds(n_thresholds), persistent=False)
        self.add_state("hist", default=torch.zeros(2, n_thresholds + 1, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        self.hist += pr_histogram(probs, target, self.thresholds)

    def compute(self) -> dict[str, torch.Tensor]:
        return pr_curve_from_histogram(self.hist, self.thresholds)
