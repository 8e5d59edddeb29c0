"""Localisation metrics (top-k overlap, heatmap AUROC, the combined dict) on hand-computed maps."""
from __future__ import annotations

import numpy as np
import pytest

from medtrust.metrics.localisation import (
    heatmap_auroc,
    localisation_metrics,
    pointing_game,
    relevance_mass,
    topk_count,
    topk_mask,
    topk_overlap,
)

# 4×4 mask: top-left 2×2 (4 px). RAMP: 15..0 in row-major order, so its top-n pixels are the first n.
MASK = np.zeros((4, 4))
MASK[:2, :2] = 1
RAMP = np.arange(16, dtype=float)[::-1].reshape(4, 4)


@pytest.mark.parametrize(("n", "k", "expected"), [
    (16, 0.1, 2),        # 1.6 -> 2
    (16, 0.25, 4),
    (16, 0.15625, 3),    # 2.5 -> 3: half up, not banker's rounding
    (16, 0.01, 1),       # 0.16 -> 0 -> at least 1
    (16, 1.0, 16),
    (100, 0.1, 10),
])
def test_topk_count(n, k, expected):
    assert topk_count(n, k) == expected


@pytest.mark.parametrize(("k", "iou", "dice"), [
    (0.1, 2 / 4, 4 / 6),     # top 2 = (0,0),(0,1), both inside: inter 2, union 4
    (0.25, 2 / 6, 4 / 8),    # top 4 = first row: inter 2, union 6
    (0.01, 1 / 4, 2 / 5),    # top 1 = (0,0)
    (1.0, 4 / 16, 8 / 20),   # every pixel
])
def test_topk_overlap_hand_computed(k, iou, dice):
    out = topk_overlap(RAMP, MASK, k)
    assert out["iou"] == pytest.approx(iou)
    assert out["dice"] == pytest.approx(dice)


def test_topk_ties_broken_by_row_major_order():
    heat = np.zeros((4, 4))
    heat[0, 0] = heat[3, 3] = 1.0  # tie between a mask pixel (first) and a background pixel (last)
    assert topk_overlap(heat, MASK, 1 / 16) == {"iou": 0.25, "dice": 0.4}
    heat2 = np.zeros((4, 4))
    heat2[0, 2] = heat2[1, 0] = 1.0  # (0,2) comes first in row-major order and is outside the mask
    assert topk_overlap(heat2, MASK, 1 / 16)["iou"] == 0.0
    # constant non-zero map: defined, the first pixels in row-major order are kept
    assert topk_mask(np.ones((4, 4)), 0.125).ravel().tolist() == [True, True] + [False] * 14
    assert topk_overlap(np.ones((4, 4)), MASK, 0.125)["iou"] == pytest.approx(0.5)


def test_topk_mask_keeps_exactly_the_count():
    heat = np.random.default_rng(0).integers(0, 3, size=(10, 10)).astype(float)  # many ties
    m = topk_mask(heat, 0.37)
    assert m.sum() == 37
    assert heat[m].min() >= heat[~m].max()


@pytest.mark.parametrize(("heat", "mask", "expected"), [
    (MASK, MASK, 1.0),
    (1 - MASK, MASK, 0.0),
    (np.ones((4, 4)), MASK, 0.5),                                  # all ties
    (np.array([[1.0, 1.0], [0.0, 0.0]]), np.array([[1, 0], [0, 0]]), 5 / 6),  # 1 tie, 2 wins of 3
    (np.array([[3.0, 1.0], [2.0, 0.5]]), np.array([[1, 1], [0, 0]]), 3 / 4),  # 1 > 2 fails only
    (RAMP, MASK, 44 / 48),  # 15, 14 beat all 12; 11, 10 beat 10 each
])
def test_heatmap_auroc_hand_computed(heat, mask, expected):
    assert heatmap_auroc(heat, mask) == pytest.approx(expected)


def test_localisation_metrics_dict():
    out = localisation_metrics(RAMP, MASK, k=0.1)
    assert out == pytest.approx({
        "pointing_game": 1.0,
        "relevance_mass": (15 + 14 + 11 + 10) / 120,
        "topk_iou": 0.5,
        "topk_dice": 2 / 3,
        "heatmap_auroc": 11 / 12,
    })
    assert out["pointing_game"] == pointing_game(RAMP, MASK)
    assert out["relevance_mass"] == relevance_mass(RAMP, MASK)


NAN_MAP = np.full((4, 4), 1.0)
NAN_MAP[2, 2] = np.nan


@pytest.mark.parametrize(("heat", "mask"), [
    (np.zeros((4, 4)), MASK),           # all-zero map
    (NAN_MAP, MASK),                    # non-finite map
    (RAMP, np.zeros((4, 4))),           # empty mask
])
def test_undefined_is_nan(heat, mask):
    assert all(np.isnan(v) for v in topk_overlap(heat, mask).values())
    assert np.isnan(heatmap_auroc(heat, mask))
    assert all(np.isnan(v) for v in localisation_metrics(heat, mask).values())


def test_auroc_nan_when_mask_covers_everything():
    assert np.isnan(heatmap_auroc(RAMP, np.ones((4, 4))))
    assert topk_overlap(RAMP, np.ones((4, 4)), 0.25)["iou"] == 0.25  # still defined


@pytest.mark.parametrize("k", [0, -0.1, 1.5, float("nan"), float("inf"), True, "0.1"])
def test_bad_k_raises_naming_k(k):
    with pytest.raises(ValueError, match=r"k must be a fraction in \(0, 1\]"):
        topk_overlap(RAMP, MASK, k)
    with pytest.raises(ValueError, match="k must"):
        localisation_metrics(RAMP, MASK, k)
    with pytest.raises(ValueError, match="k must"):
        topk_overlap(np.zeros((4, 4)), MASK, k)  # checked even when the result would be undefined


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        topk_overlap(RAMP, np.zeros((4, 5)))
    with pytest.raises(ValueError, match="shape"):
        heatmap_auroc(RAMP, np.zeros((3, 4)))
