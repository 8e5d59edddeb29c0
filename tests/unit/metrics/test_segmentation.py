"""Segmentation metrics on hand-computed cases."""
from __future__ import annotations

import pytest
import torch

from medtrust.metrics.segmentation import (
    METRIC_NAMES,
    SegmentationMetric,
    compute_confusion,
    confusion_scores,
    compute_segmentation_metrics,
    per_image_scores,
    threshold_sweep,
)


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)[None, None]


# image 1: target 4 px, prediction covers 3 of them + 1 false positive (of 16 px)
P1 = t([[0.9, 0.8, 0.0, 0.0], [0.7, 0.2, 0.0, 0.6], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
T1 = t([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])


def test_confusion_counts_and_threshold_is_inclusive():
    assert compute_confusion(P1, T1, 0.5).tolist() == [[3, 1, 11, 1]]
    assert compute_confusion(P1, T1, 0.6).tolist() == [[3, 1, 11, 1]]  # 0.6 >= 0.6 counts
    assert compute_confusion(P1, T1, 0.61).tolist() == [[3, 0, 12, 1]]


def test_hand_computed_metrics():
    m = compute_segmentation_metrics(compute_confusion(P1, T1))
    assert m["dice"] == pytest.approx(6 / 8)
    assert m["iou"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(3 / 4) and m["recall"] == pytest.approx(3 / 4)
    assert m["accuracy"] == pytest.approx(14 / 16)
    assert m["fp_rate"] == pytest.approx(1 / 16) and m["fn_rate"] == pytest.approx(1 / 16)


def test_dice_is_per_image_mean_while_f1_is_pooled():
    p2, t2 = torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)  # empty target, empty prediction: Dice 1
    m = compute_segmentation_metrics(compute_confusion(torch.cat([P1, p2]), torch.cat([T1, t2])))
    assert m["dice"] == pytest.approx((0.75 + 1.0) / 2)
    assert m["f1"] == pytest.approx(0.75)
    per = per_image_scores(compute_confusion(torch.cat([P1, p2]), torch.cat([T1, t2])))
    assert per["dice"].tolist() == pytest.approx([0.75, 1.0])


def test_batch_of_one_and_shape_mismatch():
    assert compute_confusion(P1, T1).shape == (1, 4)
    with pytest.raises(ValueError, match="shape"):
        compute_confusion(P1, T1[..., :2])


def test_accumulating_metric_equals_one_shot():
    torch.manual_seed(0)
    probs, target = torch.rand(10, 1, 8, 8), (torch.rand(10, 1, 8, 8) > 0.6).float()
    metric = SegmentationMetric()
    for i in range(0, 10, 3):
        metric.update(probs[i:i + 3], target[i:i + 3])
    got = {k: float(v) for k, v in metric.compute().items()}
    want = compute_segmentation_metrics(compute_confusion(probs, target))
    for k, v in got.items():
        assert v == pytest.approx(want[k]), k


def test_threshold_sweep_trades_precision_for_recall():
    torch.manual_seed(1)
    target = (torch.rand(6, 1, 16, 16) > 0.5).float()
    probs = (0.6 * target + 0.4 * torch.rand_like(target)).clamp(0, 1)
    rows = threshold_sweep(probs, target, [0.1, 0.5, 0.9])
    assert rows[0]["recall"] >= rows[1]["recall"] >= rows[2]["recall"]
    assert rows[0]["fp_rate"] >= rows[2]["fp_rate"] and rows[0]["fn_rate"] <= rows[2]["fn_rate"]


def image_with(tp: int, fp: int, fn: int, side: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """A 1×1×side×side image with exactly ``tp``, ``fp``, ``fn`` pixels (the rest true negatives)."""
    pred = torch.zeros(side * side)
    gt = torch.zeros(side * side)
    pred[: tp + fp] = 1.0
    gt[:tp] = 1.0
    gt[tp + fp: tp + fp + fn] = 1.0
    return pred.reshape(1, 1, side, side), gt.reshape(1, 1, side, side)


# (tp, fp, fn) of a 16-pixel image -> hand values. One convention: a ratio with a zero denominator
# is 1 when tp + fp + fn == 0 (nothing to find, nothing predicted), else 0.
CASES = {
    "all-empty": ((0, 0, 0), dict(dice=1, iou=1, precision=1, recall=1, f1=1, accuracy=1, fp_rate=0, fn_rate=0)),
    "empty-gt-with-fp": ((0, 2, 0), dict(dice=0, iou=0, precision=0, recall=0, f1=0, accuracy=14 / 16,
                                         fp_rate=2 / 16, fn_rate=0)),
    "gt-with-empty-pred": ((0, 0, 3), dict(dice=0, iou=0, precision=0, recall=0, f1=0, accuracy=13 / 16,
                                           fp_rate=0, fn_rate=3 / 16)),
    "normal": ((3, 1, 1), dict(dice=6 / 8, iou=3 / 5, precision=3 / 4, recall=3 / 4, f1=6 / 8, accuracy=14 / 16,
                               fp_rate=1 / 16, fn_rate=1 / 16)),
}


@pytest.mark.parametrize(("counts", "want"), CASES.values(), ids=CASES.keys())
def test_one_empty_mask_convention_in_all_three_paths(counts, want):
    probs, target = image_with(*counts)
    conf = compute_confusion(probs, target)
    tp, fp, fn = counts
    assert conf.tolist() == [[tp, fp, 16 - tp - fp - fn, fn]]
    per = per_image_scores(conf)
    pooled = compute_segmentation_metrics(conf)
    metric = SegmentationMetric()
    metric.update(probs, target)
    streamed = {k: float(v) for k, v in metric.compute().items()}
    for k in METRIC_NAMES:
        assert pooled[k] == pytest.approx(want[k]), ("pooled", k)
        assert streamed[k] == pytest.approx(want[k]), ("metric", k)
    for k, v in per.items():
        assert v.tolist() == pytest.approx([want[k]]), ("per-image", k)


def test_confusion_scores_is_elementwise_and_checks_its_input():
    conf = torch.tensor([[0, 0, 16, 0], [0, 2, 14, 0], [0, 0, 13, 3], [3, 1, 11, 1]])
    s = confusion_scores(conf)
    assert s["precision"].tolist() == pytest.approx([1, 0, 0, 3 / 4])
    assert s["recall"].tolist() == pytest.approx([1, 0, 0, 3 / 4])
    assert s["dice"].tolist() == pytest.approx([1, 0, 0, 3 / 4])
    with pytest.raises(ValueError, match="last axis of 4"):
        confusion_scores(torch.zeros(2, 3))


def test_metric_streamed_over_batches_with_empty_masks_equals_concatenation():
    imgs = [image_with(*c) for c, _ in CASES.values()] + [image_with(0, 0, 0), image_with(2, 0, 5)]
    probs, target = torch.cat([p for p, _ in imgs]), torch.cat([t for _, t in imgs])
    metric = SegmentationMetric()
    for i in range(0, len(imgs), 4):  # batches of 4 and 2
        metric.update(probs[i:i + 4], target[i:i + 4])
    got = {k: float(v) for k, v in metric.compute().items()}
    want = compute_segmentation_metrics(compute_confusion(probs, target))
    assert set(got) == set(METRIC_NAMES)
    for k in METRIC_NAMES:
        assert got[k] == pytest.approx(want[k]), k
