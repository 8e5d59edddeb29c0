"""Segmentation metrics on hand-computed cases."""
from __future__ import annotations

import pytest
import torch

from medtrust.metrics.segmentation import (
    SegmentationMetric,
    compute_confusion,
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
