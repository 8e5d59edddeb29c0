"""The audit's statistics on simulated classifiers of known behaviour: rates, disparities with
simultaneous CIs, paired shifts and hallucination excess, and the coverage of their 95 % CIs."""
from __future__ import annotations

import numpy as np
import pytest

from medtrust.metrics.audit import (boot_cluster_means, boot_means, disparity, excess_rate, kappa_agreement, paired_shift,
                                   rate, standardised_excess)


def test_rate_is_wilson_and_small_cells_are_insufficient():
    r = rate([1] * 7 + [0] * 3)
    assert r["rate"] == 0.7 and r["n"] == 10 and 0.39 < r["ci"][0] < 0.40 and 0.89 < r["ci"][1] < 0.90
    assert rate([1, 0, 1], min_n=5) == {"status": "insufficient", "n": 3}
    with pytest.raises(ValueError, match="0/1"):
        rate([0.5, 1])


def _groups(rng, rates, n):
    return {g: (rng.random(n) < p).astype(float) for g, p in rates.items()}


def test_a_20_point_gap_is_found_and_its_group_named():
    rng = np.random.default_rng(0)
    d = disparity(_groups(rng, {"A": 0.8, "B": 0.8, "Hispanic": 0.6}, 300), seed=1, n_perm=500)
    assert d["lowest"] == "Hispanic" and d["p"] < 0.01
    lo, hi = d["gap_ci"]
    assert lo < 0.2 < hi and lo > 0.05
    assert d["ratio"] == pytest.approx(d["groups"]["Hispanic"]["rate"] / d["groups"][d["highest"]]["rate"])
    assert d["ratio_ci"][0] < d["ratio"] < d["ratio_ci"][1]


def test_simultaneous_ci_covers_zero_with_equal_groups_where_a_naive_pair_ci_would_not():
    """Five equal groups: the chosen (most extreme) pair's CI must still cover 0 about 95 % of the time,
    and the permutation p must reject about 5 % of the time."""
    rng = np.random.default_rng(1)
    cover, reject, naive = 0, 0, 0
    reps = 200
    for k in range(reps):
        d = disparity(_groups(rng, {g: 0.7 for g in "ABCDE"}, 120), seed=k, n_boot=1000, n_perm=300)
        cover += d["gap_ci"][0] <= 0 <= d["gap_ci"][1]
        reject += d["p"] < 0.05
        se = np.sqrt(sum(d["groups"][g]["rate"] * (1 - d["groups"][g]["rate"]) / 120 for g in (d["highest"], d["lowest"])))
        naive += d["gap"] - 1.96 * se <= 0
    assert cover / reps >= 0.93 and reject / reps <= 0.09
    assert naive / reps < 0.85  # the ordinary pair interval of the chosen pair misses 0 far too often


def test_the_corrected_gap_recovers_the_generators_gap_through_an_imperfect_classifier():
    """The generator draws a requested finding for 80 % / 60 % of two groups; a classifier with
    sensitivity 0.85 and false-positive rate 0.1 sees a gap of 0.2 * 0.75 = 0.15. The corrected gap
    (divided by Youden's J measured on real images) covers 0.2 in ~95 % of repetitions."""
    rng = np.random.default_rng(2)
    cover_c, cover_raw_truth, reps = 0, 0, 150
    for k in range(reps):
        flags = {}
        for g, p in {"F": 0.8, "M": 0.6}.items():
            drawn = rng.random(400) < p
            flags[g] = np.where(drawn, rng.random(400) < 0.85, rng.random(400) < 0.1).astype(float)
        sens, fpr = (rng.random(300) < 0.85).astype(float), (rng.random(300) < 0.1).astype(float)
        d = disparity(flags, seed=k, n_boot=1000, n_perm=50, correction=(sens, fpr))
        lo, hi = d["corrected"]["gap_ci"]
        cover_c += lo <= 0.2 <= hi
        cover_raw_truth += d["gap_ci"][0] <= 0.2 <= d["gap_ci"][1]
    assert cover_c / reps >= 0.9
    assert cover_raw_truth / reps < cover_c / reps  # uncorrected, the classifier's errors shrink the gap


def test_too_few_sufficient_groups_give_no_gap():
    d = disparity({"A": [1, 0] * 20, "B": [1, 0, 1]}, min_n=10)
    assert d["gap"] is None and d["groups"]["B"] == {"status": "insufficient", "n": 3} and d["n_groups"] == 1


def test_paired_shift_pairs_the_counterfactuals():
    rng = np.random.default_rng(3)
    without = (rng.random(400) < 0.5).astype(float)
    with_ = without.copy()
    flip = (without == 1) & (rng.random(400) < 0.26)  # the terms suppress 26 % of positive calls
    with_[flip] = 0
    s = paired_shift(with_, without, seed=0)
    assert s["shift"] == pytest.approx(-flip.mean()) and s["shift_ci"][1] < 0
    assert s["relative_shift_ci"][0] < -0.26 < s["relative_shift_ci"][1]
    # the paired CI is much narrower than an unpaired one would be
    assert s["shift_ci"][1] - s["shift_ci"][0] < 0.08
    null = paired_shift(without, without)
    assert null["shift"] == 0 and null["shift_ci"] == [0.0, 0.0] and null["changed"] == 0
    with pytest.raises(ValueError, match="different lengths"):
        paired_shift([1, 0], [1])


@pytest.mark.parametrize("h", [0.0, 0.4])
def test_hallucination_excess_and_its_correction_cover_the_truth(h):
    """A generator draws an unasked finding in a share h of its images; a classifier (sensitivity 0.9,
    false-positive rate 0.1) flags it. The raw rate includes the false positives; the excess over real
    negatives estimates h * J, the corrected rate estimates h. With h = 0 the excess CI covers 0."""
    rng = np.random.default_rng(4)
    cover_excess, cover_corr, reps = 0, 0, 150
    for k in range(reps):
        truth = rng.random(500) < h
        gen = np.where(truth, rng.random(500) < 0.9, rng.random(500) < 0.1).astype(float)
        neg, pos = (rng.random(400) < 0.1).astype(float), (rng.random(200) < 0.9).astype(float)
        e = excess_rate(gen, neg, pos, seed=k, n_boot=1000)
        cover_excess += e["excess_ci"][0] <= h * 0.8 <= e["excess_ci"][1]
        cover_corr += e["corrected_ci"][0] <= h <= e["corrected_ci"][1]
    assert cover_excess / reps >= 0.9 and cover_corr / reps >= 0.9


def test_excess_of_tiny_cells_is_insufficient():
    e = excess_rate([1, 0, 1], [0] * 50)
    assert e["status"] == "insufficient" and e["n"] == 3 and e["n_real"] == 50


def test_agreement_of_classifiers():
    a = np.array([1, 1, 0, 0, 1, 0] * 10, float)
    k = kappa_agreement({"c1": a, "c2": a, "c3": 1 - a})
    assert k["cohen_kappa"]["c1|c2"] == pytest.approx(1.0) and k["cohen_kappa"]["c1|c3"] == pytest.approx(-1.0)
    assert k["all_agree"] == 0.0


def test_standardising_on_what_was_asked_removes_a_false_excess():
    """A COVID classifier flags 8 % of images that show pneumonia and 0.5 % of the others, and there is no
    hallucination. Generated images ask for pneumonia half of the time, real negatives show it 20 % of the
    time: the plain excess calls the make-up difference a hallucination, the standardised one does not."""
    rng = np.random.default_rng(5)
    cover_plain, cover_std, reps = 0, 0, 150
    for k in range(reps):
        g = {"asked": (rng.random(500) < 0.08).astype(float), "not asked": (rng.random(500) < 0.005).astype(float)}
        r = {"asked": (rng.random(200) < 0.08).astype(float), "not asked": (rng.random(800) < 0.005).astype(float)}
        pos = {"asked": (rng.random(100) < 0.9).astype(float), "not asked": (rng.random(100) < 0.95).astype(float)}
        plain = excess_rate(np.concatenate(list(g.values())), np.concatenate(list(r.values())), seed=k, n_boot=500)
        std = standardised_excess(g, r, pos, seed=k, n_boot=500)
        cover_plain += plain["excess_ci"][0] <= 0 <= plain["excess_ci"][1]
        cover_std += std["excess_ci"][0] <= 0 <= std["excess_ci"][1] and std["corrected_ci"][0] <= 0 <= std["corrected_ci"][1]
    assert cover_std / reps >= 0.9 and cover_plain / reps < 0.6
    assert set(std["strata"]) == {"asked", "not asked"} and std["strata"]["asked"]["weight"] == 0.5
    few = standardised_excess(g, {"asked": r["asked"][:3], "not asked": r["not asked"]}, None)
    assert few["strata"]["asked"]["baseline"] == "all strata"


def test_pairs_of_identical_images_are_resampled_together():
    """Each image twice (a counterfactual pair the generator drew alike): resampling images would halve the
    variance of the mean, resampling the pairs keeps it."""
    rng = np.random.default_rng(6)
    x = (rng.random(300) < 0.3).astype(float)
    doubled, pairs = np.repeat(x, 2), np.repeat(np.arange(300), 2)
    naive = boot_means(doubled, 4000, np.random.default_rng(0)).std()
    clustered = boot_cluster_means(doubled, pairs, 4000, np.random.default_rng(0)).std()
    single = boot_means(x, 4000, np.random.default_rng(0)).std()
    assert clustered == pytest.approx(single, rel=0.1) and clustered / naive == pytest.approx(np.sqrt(2), rel=0.1)


def test_downstream_gain_finds_a_better_augmented_classifier_and_not_an_equal_one():
    """Known truth: the augmented classifiers' scores carry less noise than the baselines' (a real gain);
    the CI of the mean AUROC change excludes 0 and the per-pair figures are the plain ones. Identical
    pairs give exactly 0. Bad pairings are refused."""
    from sklearn.metrics import roc_auc_score

    from medtrust.metrics.audit import downstream_gain

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    base = [y + rng.normal(0, 1.2, 400) for _ in range(3)]
    aug = [y + rng.normal(0, 0.6, 400) for _ in range(3)]
    sig = lambda x: 1 / (1 + np.exp(-(x - 0.5) * 3))  # noqa: E731
    base, aug = [sig(x) for x in base], [sig(x) for x in aug]
    g = downstream_gain(base, aug, y, n_boot=300, seed=0)
    assert g["n_pairs"] == 3 and g["n_images"] == 400
    assert g["pairs"][1]["auroc_baseline"] == pytest.approx(roc_auc_score(y, base[1]))
    assert g["auroc"]["diff"] == pytest.approx(np.mean([roc_auc_score(y, a) - roc_auc_score(y, b) for a, b in zip(aug, base)]))
    assert g["auroc"]["diff"] > 0.08 and g["auroc"]["diff_ci"][0] > 0 and g["accuracy"]["diff_ci"][0] > 0
    assert g["auroc"]["diff_sd_across_pairs"] > 0
    same = downstream_gain(base, base, y, n_boot=100)
    assert same["auroc"]["diff"] == 0 and same["auroc"]["diff_ci"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="expected pairs"):
        downstream_gain(base, aug[:2], y)
    with pytest.raises(ValueError, match="lengths differ"):
        downstream_gain(base, [a[:-1] for a in aug], y)
    with pytest.raises(ValueError, match="need both classes"):
        downstream_gain(base, aug, np.zeros(400, int))
