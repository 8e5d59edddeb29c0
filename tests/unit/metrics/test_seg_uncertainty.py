"""Pixel-uncertainty summaries of a segmenter: boundary distances, the QC curve, pixel-error AUROC."""
from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from medtrust.evaluation.seg_uncertainty import (_h, boundary_profile, pixel_error_auroc, qc_curve,
                                                 signed_distance)


def _disc(size: int = 40, r: float = 10) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= r ** 2).astype(np.float32)


def test_signed_distance_positive_inside_negative_outside():
    m = np.zeros((7, 7))
    m[2:5, 2:5] = 1
    d = signed_distance(m)
    assert d[3, 3] == 2 and d[2, 2] == 1 and d[1, 3] == -1 and d[0, 3] == -2
    assert np.isinf(signed_distance(np.zeros((4, 4)))).all() and (signed_distance(np.zeros((4, 4))) < 0).all()


def test_a_blurred_mask_is_confident_at_the_core_and_unsure_at_the_boundary():
    """Known truth: the probability is the ground truth blurred, so confidence must fall towards the boundary
    from both sides and entropy peak there."""
    m = np.stack([_disc(), _disc(r=7)])
    p = np.stack([gaussian_filter(x, 2.0) for x in m])
    prob, masks = torch.from_numpy(p)[:, None], torch.from_numpy(m)[:, None]
    rows = {r["distance_px"]: r for r in boundary_profile(prob, _h(prob), masks, 6)}
    assert rows[5]["confidence"] > rows[1]["confidence"] and rows[-5]["confidence"] > rows[-1]["confidence"]
    assert max(rows.values(), key=lambda r: r["entropy"])["distance_px"] in (-1, 1)
    assert sum(r["n_pixels"] for r in rows.values()) == m.size


def test_qc_curve_orders_random_uncertainty_and_oracle():
    rng = np.random.default_rng(0)
    dice = rng.uniform(0.3, 0.95, 200)
    fr = [0.0, 0.1, 0.3]
    perfect = qc_curve(dice, -dice, fr)          # uncertainty = 1 - Dice ranks exactly like the oracle
    assert [r["dice_kept"] for r in perfect] == [r["dice_kept_oracle"] for r in perfect]
    useless = qc_curve(dice, rng.uniform(size=200), fr)
    assert perfect[0]["dice_kept"] == useless[0]["dice_kept"] == dice.mean()
    assert perfect[2]["dice_kept"] > useless[2]["dice_kept"] - 1e-9 and perfect[2]["dice_kept"] > dice.mean()
    assert perfect[2]["n_kept"] == 140


def test_pixel_error_auroc_finds_uncertain_errors():
    m = _disc()[None, None]
    prob = torch.from_numpy(gaussian_filter(m[0, 0], 2.0))[None, None]
    masks = torch.from_numpy(m)
    auroc = pixel_error_auroc(prob, _h(prob), masks, 0.5, 10_000, 0)
    assert auroc is not None and auroc > 0.9          # the errors are on the blurred boundary, where entropy is high
    assert pixel_error_auroc(masks, _h(masks), masks, 0.5, 10_000, 0) is None   # no error at all: undefined


def test_paired_dice_difference_finds_a_real_gap_and_not_noise():
    from medtrust.evaluation.segmentation import _paired_dice_differences

    rng = np.random.default_rng(0)
    base = rng.uniform(0.7, 0.95, 30)
    better = base + 0.03 + rng.normal(0, 0.01, 30)          # 0.03 better on every image, a little noise
    noise = base + rng.normal(0, 0.01, 30)                  # the same model, re-run
    rows = [{}, {}, {}]
    _paired_dice_differences(rows, [base, better, noise])
    assert rows[1]["dice_diff_ci_low"] > 0.02 and rows[1]["dice_diff_wilcoxon_p"] < 1e-4
    assert rows[2]["dice_diff_ci_low"] < 0 < rows[2]["dice_diff_ci_high"] and rows[2]["dice_diff_wilcoxon_p"] > 0.05
    assert rows[1]["dice_diff_n_images"] == 30 and "dice_diff_vs_first" not in rows[0]
