"""Dice/IoU lie in [0, 1], are symmetric, are 1 on identical masks and score empty vs empty as 1."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from medtrust.metrics.segmentation import (
    SegmentationMetric,
    compute_confusion,
    compute_segmentation_metrics,
    per_image_scores,
)


@st.composite
def mask_pairs(draw, same: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Two binary B×1×H×W float masks (prediction, target); ``same``: the target is the prediction."""
    shape = (draw(st.integers(1, 4)), 1, draw(st.integers(1, 10)), draw(st.integers(1, 10)))
    pred = draw(arrays(np.bool_, shape))
    target = pred.copy() if same else draw(arrays(np.bool_, shape))
    return torch.from_numpy(pred).float(), torch.from_numpy(target).float()


def scores(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image scores exactly as evaluation, training and reports compute them."""
    return per_image_scores(compute_confusion(pred, target))


def summary(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """The reported summary (one shot) and the streaming metric (two batches) must agree; returns the former."""
    one_shot = compute_segmentation_metrics(compute_confusion(pred, target))
    metric = SegmentationMetric()
    half = max(1, pred.shape[0] // 2)
    metric.update(pred[:half], target[:half])
    if half < pred.shape[0]:
        metric.update(pred[half:], target[half:])
    streamed = metric.compute()
    for k in ("dice", "iou"):
        assert float(streamed[k]) == pytest.approx(one_shot[k], abs=1e-12), k
    return one_shot


@settings(max_examples=100)
@given(mask_pairs())
def test_dice_and_iou_are_in_unit_interval_and_symmetric(pair):
    pred, target = pair
    fwd, bwd = scores(pred, target), scores(target, pred)
    for k in ("dice", "iou"):
        assert ((fwd[k] >= 0) & (fwd[k] <= 1)).all(), (k, fwd[k])
        assert torch.equal(fwd[k], bwd[k]), (k, fwd[k], bwd[k])
    # swapping the roles swaps false positives and false negatives, hence precision and recall
    assert torch.equal(fwd["precision"], bwd["recall"]) and torch.equal(fwd["recall"], bwd["precision"])
    # IoU = Dice / (2 - Dice) per image (both from the same counts), so IoU <= Dice
    assert torch.allclose(fwd["iou"], fwd["dice"] / (2 - fwd["dice"]), rtol=0, atol=1e-12)
    s_fwd, s_bwd = summary(pred, target), summary(target, pred)
    for k in ("dice", "iou", "f1", "accuracy"):
        assert 0 <= s_fwd[k] <= 1, (k, s_fwd[k])
        assert s_fwd[k] == pytest.approx(s_bwd[k], abs=1e-12), k


@settings(max_examples=60)
@given(mask_pairs(same=True))
def test_identical_masks_score_one(pair):
    """Identical masks (empty ones included: see the next test) have Dice = IoU = 1, per image and summarised."""
    pred, target = pair
    per = scores(pred, target)
    assert torch.equal(per["dice"], torch.ones_like(per["dice"]))
    assert torch.equal(per["iou"], torch.ones_like(per["iou"]))
    s = summary(pred, target)
    assert s["dice"] == s["iou"] == s["f1"] == s["accuracy"] == 1.0


@settings(max_examples=40)
@given(st.integers(1, 10), st.integers(1, 10), st.data())
def test_empty_mask_convention(h, w, data):
    """Module docstring of ``medtrust.metrics.segmentation``: a zero-denominator overlap ratio is 1.0 when
    nothing was to be found and nothing was predicted, else 0.0. So empty vs empty scores 1, and an empty
    target against a non-empty prediction (or the reverse, by symmetry) scores 0."""
    empty = torch.zeros(1, 1, h, w)
    per = scores(empty, empty)
    for k in ("dice", "iou", "precision", "recall"):
        assert per[k].tolist() == [1.0], k
    some = torch.from_numpy(data.draw(arrays(np.bool_, (1, 1, h, w)).filter(np.any))).float()
    for pred, target in ((some, empty), (empty, some)):
        per = scores(pred, target)
        assert per["dice"].tolist() == [0.0] and per["iou"].tolist() == [0.0]
