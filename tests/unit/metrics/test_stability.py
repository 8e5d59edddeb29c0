"""Stability of explanations: pairwise agreement, centre-of-mass shift, T-map summary, and the
relation of stability to uncertainty and correctness, on hand-computed maps."""
from __future__ import annotations

import math

import numpy as np
import pytest

from medtrust.metrics.stability import (
    center_of_mass,
    com_shift,
    map_stability,
    rank_correlation,
    stability_vs_uncertainty,
    topk_agreement,
)

RAMP = np.arange(16, dtype=float)[::-1].reshape(4, 4)  # 15..0 row-major
REV = RAMP[::-1, ::-1].copy()                           # 0..15 row-major
SWAP = RAMP.copy()
SWAP.flat[3], SWAP.flat[4] = 11.0, 12.0                 # top-4 becomes flat {0, 1, 2, 4}
# centres of mass: RAMP (5/6, 4/3); REV mirrored (13/6, 5/3)
SHIFT = math.hypot(4 / 3, 1 / 3)
NEG = -np.ones((4, 4))
NEG[0, 0] = -2.0                                         # ranked, but no positive part
NAN_MAP = RAMP.copy()
NAN_MAP[1, 1] = np.nan


@pytest.mark.parametrize(("a", "b", "k", "expected"), [
    (RAMP, RAMP, 0.25, 1.0),
    (RAMP, REV, 0.25, 0.0),
    (RAMP, SWAP, 0.25, 3 / 5),
    (RAMP, SWAP, 0.125, 1.0),       # top 2 unchanged
    (RAMP, REV, 1.0, 1.0),
    (RAMP, 2 * RAMP + 1, 0.1, 1.0),  # only the ranking matters
])
def test_topk_agreement(a, b, k, expected):
    assert topk_agreement(a, b, k) == pytest.approx(expected)


@pytest.mark.parametrize(("a", "b", "expected"), [
    (RAMP, RAMP, 1.0),
    (RAMP, REV, -1.0),
    (RAMP, np.exp(RAMP), 1.0),
    (np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[1.0, 3.0], [2.0, 4.0]]), 0.8),  # 1 - 6*2/(4*15)
])
def test_rank_correlation(a, b, expected):
    assert rank_correlation(a, b) == pytest.approx(expected)


@pytest.mark.parametrize("bad", [np.zeros((4, 4)), NAN_MAP])
def test_undefined_maps_give_nan(bad):
    assert np.isnan(rank_correlation(RAMP, bad)) and np.isnan(rank_correlation(bad, RAMP))
    assert np.isnan(topk_agreement(RAMP, bad)) and np.isnan(topk_agreement(bad, RAMP))


def test_constant_map_has_no_rank_correlation_but_tie_broken_topk():
    const = np.full((4, 4), 3.0)
    assert np.isnan(rank_correlation(RAMP, const))
    assert topk_agreement(RAMP, const, 0.25) == 1.0  # ties -> first 4 pixels, same as RAMP's top 4
    assert topk_agreement(REV, const, 0.25) == 0.0


def test_center_of_mass_hand_computed():
    a = np.zeros((4, 5))
    a[1, 2] = 7.0
    assert center_of_mass(a) == (1.0, 2.0)
    b = np.zeros((4, 4))
    b[0, 0], b[0, 3] = 1.0, 3.0
    b[3, 3] = -10.0  # negative part ignored
    assert center_of_mass(b) == pytest.approx((0.0, 2.25))
    assert center_of_mass(RAMP) == pytest.approx((5 / 6, 4 / 3))
    assert all(np.isnan(center_of_mass(NEG)))
    assert all(np.isnan(center_of_mass(NAN_MAP)))
    with pytest.raises(ValueError, match="2-D"):
        center_of_mass(np.ones(4))


def test_com_shift():
    a, b = np.zeros((5, 5)), np.zeros((5, 5))
    a[0, 0], b[3, 4] = 1.0, 2.0
    assert com_shift(a, b) == pytest.approx(5.0)
    assert com_shift(RAMP, REV) == pytest.approx(SHIFT)
    assert np.isnan(com_shift(RAMP, NEG))


def test_map_stability_all_pairs():
    out = map_stability(np.stack([RAMP, RAMP, REV]), k=0.25)
    # pairs (R,R): 1, 1, 0 ; (R,V) twice: 0, -1, SHIFT
    assert out["topk_iou"] == pytest.approx(1 / 3)
    assert out["spearman"] == pytest.approx(-1 / 3)
    assert out["com_shift_px"] == pytest.approx(2 * SHIFT / 3)
    assert out["n_pairs"] == 3 and out["n_undefined"] == 0


def test_map_stability_identical_maps_are_perfectly_stable():
    out = map_stability(np.stack([SWAP] * 4), k=0.1)
    assert out["n_pairs"] == 6
    assert (out["topk_iou"], out["spearman"], out["com_shift_px"]) == pytest.approx((1.0, 1.0, 0.0))


def test_map_stability_with_reference_excludes_and_counts_undefined():
    out = map_stability(np.stack([RAMP, REV, np.zeros((4, 4)), NEG]), reference=RAMP, k=0.25)
    # (R,R): 1, 1, 0 ; (R,V): 0, -1, SHIFT ; (R,0): all NaN ; (R,NEG): iou, rho defined, com NaN
    iou_neg = topk_agreement(RAMP, NEG, 0.25)  # NEG top-4: (0,1..3),(1,0) by ties -> {1,2,3,4}
    assert iou_neg == pytest.approx(3 / 5)
    rho_neg = rank_correlation(RAMP, NEG)
    assert out["n_pairs"] == 4
    assert out["topk_iou"] == pytest.approx((1 + 0 + iou_neg) / 3)
    assert out["spearman"] == pytest.approx((1 - 1 + rho_neg) / 3)
    assert out["com_shift_px"] == pytest.approx(SHIFT / 2)
    assert out["n_undefined"] == 2
    assert (out["n_undefined_topk_iou"], out["n_undefined_spearman"], out["n_undefined_com_shift_px"]) == (1, 1, 2)


def test_map_stability_degenerate_and_bad_inputs():
    out = map_stability(RAMP[None])
    assert out["n_pairs"] == 0 and np.isnan(out["topk_iou"]) and np.isnan(out["spearman"])
    with pytest.raises(ValueError, match="T×H×W"):
        map_stability(RAMP)
    with pytest.raises(ValueError, match="reference shape"):
        map_stability(np.stack([RAMP, RAMP]), reference=np.ones((3, 3)))
    with pytest.raises(ValueError, match="k must"):
        map_stability(np.stack([RAMP, RAMP]), k=0)


@pytest.mark.parametrize("k", [0, 1.01, -1, float("nan")])
def test_topk_agreement_bad_k(k):
    with pytest.raises(ValueError, match=r"k must be a fraction in \(0, 1\]"):
        topk_agreement(RAMP, RAMP, k)


def test_shape_mismatch():
    with pytest.raises(ValueError, match="shapes differ"):
        topk_agreement(RAMP, np.ones((4, 5)))
    with pytest.raises(ValueError, match="shapes differ"):
        rank_correlation(RAMP, np.ones((2, 2)))
    with pytest.raises(ValueError, match="shapes differ"):
        com_shift(RAMP, np.ones((2, 2)))


def test_stability_vs_uncertainty_hand_computed():
    stab = np.array([0.9, 0.8, 0.7, 0.2, 0.1, np.nan])
    unc = np.array([0.1, 0.2, 0.3, 0.8, 0.9, 0.5])
    correct = np.array([1, 1, 1, 0, 0, 1])
    out = stability_vs_uncertainty(stab, unc, correct)
    assert out["n_dropped"] == 1
    assert out["spearman_rho"] == pytest.approx(-1.0)
    assert out["spearman_p"] < 0.05
    assert out["mean_stability_correct"] == pytest.approx(0.8)
    assert out["mean_stability_incorrect"] == pytest.approx(0.15)
    assert (out["n_correct"], out["n_incorrect"]) == (3, 2)
    assert out["mannwhitney_u"] == 6.0           # every correct image beats every incorrect one
    assert out["mannwhitney_p"] == pytest.approx(0.2)  # exact: 2 * 1 / C(5, 2)
    assert out["note"] is None


def test_stability_vs_uncertainty_small_group_skips_test():
    out = stability_vs_uncertainty(np.array([0.5, 0.6, 0.7, 0.1]), np.array([0.1, 0.2, 0.3, 0.4]),
                                   np.array([True, True, True, False]))
    assert out["mannwhitney_u"] is None and out["mannwhitney_p"] is None
    assert "1 incorrect" in out["note"]
    assert out["mean_stability_incorrect"] == pytest.approx(0.1)
    out = stability_vs_uncertainty(np.array([0.5, 0.6]), np.array([0.1, 0.2]), np.array([1, 1]))
    assert np.isnan(out["mean_stability_incorrect"]) and out["n_incorrect"] == 0
    assert np.isnan(out["spearman_rho"])  # fewer than 3 images


def test_stability_vs_uncertainty_shape_mismatch():
    with pytest.raises(ValueError, match="1-D of one length"):
        stability_vs_uncertainty(np.ones(3), np.ones(4), np.ones(3))
    with pytest.raises(ValueError, match="1-D of one length"):
        stability_vs_uncertainty(np.ones((2, 2)), np.ones((2, 2)), np.ones((2, 2)))
