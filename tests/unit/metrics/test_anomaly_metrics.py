"""Benchmark metrics of an anomaly detector, on constructed scores and maps with known answers."""
from __future__ import annotations

import numpy as np
import pytest

from medtrust.metrics.anomaly import auroc_with_ci, benchmark_metrics, kind_aurocs, paired_wilcoxon


def _bench(seed: int = 0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(20):  # clean
        rows.append(("clean", 0, 0, rng.normal(0, 0.1, (8, 8)), np.zeros((8, 8), bool)))
    for cohort in ("easy", "hard"):
        for sev in (1, 2, 3, 4, 5):
            for d in range(4):
                mask = np.zeros((8, 8), bool)
                y, x = rng.integers(0, 6, 2)
                mask[y:y + 2, x:x + 2] = True
                amp = sev if cohort == "easy" else 0.0  # the hard cohort leaves no trace in the map
                rows.append((cohort, 1, sev, rng.normal(0, 0.1, (8, 8)) + amp * mask, mask))
    cohorts, labels, sev, maps, masks = map(list, zip(*rows))
    maps = np.stack(maps)
    scores = maps.reshape(len(maps), -1).max(1)
    return scores, np.array(labels), cohorts, np.array(sev), maps, np.stack(masks)


def test_a_detectable_cohort_scores_high_and_an_invisible_one_at_chance():
    scores, labels, cohorts, sev, maps, masks = _bench()
    r = benchmark_metrics(scores, labels, cohorts, sev, maps, masks, pixel_threshold=0.5, image_threshold=0.4,
                          n_boot=200)
    easy, hard = r["cohorts"]["easy"], r["cohorts"]["hard"]
    assert easy["auroc"] == 1.0 and easy["pixel_auroc"] > 0.99 and easy["dice"] == 1.0 and easy["iou"] == 1.0
    assert easy["pointing_game"] == 1.0 and easy["spearman_severity"] > 0.9
    # a perfect but noisy map of a 4-pixel mask: Spearman against a binary mask is bounded well below 1
    assert 0.3 < easy["spearman_map_mask"] < 0.6 and abs(r["cohorts"]["hard"]["spearman_map_mask"]) < 0.1
    assert easy["flagged_injected"] == 1.0 and easy["n_injected"] == 20 and easy["n_clean"] == 20
    assert 0.2 < hard["auroc"] < 0.8 and abs(hard["pixel_auroc"] - 0.5) < 0.1 and hard["dice"] < 0.2
    lo, hi = hard["auroc_ci"]
    assert lo < 0.5 < hi or lo < hard["auroc"] < hi
    assert r["overall"]["n_injected"] == 40 and easy["auroc"] > r["overall"]["auroc"] > hard["auroc"]


def test_kind_aurocs_expose_the_kind_a_cohort_average_hides():
    """One cohort of two kinds: one seen (AUROC 1), one invisible (at chance); the cohort's AUROC is
    between them, the per-kind figures show which kind escapes."""
    scores, labels, cohorts, sev, maps, masks = _bench()
    kinds = ["clean" if c == "clean" else "seen" if c == "easy" else "unseen" for c in cohorts]
    merged = ["clean" if c == "clean" else "one" for c in cohorts]
    r = kind_aurocs(scores, labels, kinds, sev, n_boot=200)
    assert set(r) == {"seen", "unseen"} and r["seen"]["n_injected"] == r["unseen"]["n_injected"] == 20
    assert r["seen"]["auroc"] == 1.0 and r["seen"]["spearman_severity"] > 0.9
    assert 0.2 < r["unseen"]["auroc"] < 0.8 and r["unseen"]["auroc_ci"][0] < 0.5
    cohort = benchmark_metrics(scores, labels, merged, sev, maps, masks, n_boot=0)["cohorts"]["one"]["auroc"]
    assert r["unseen"]["auroc"] < cohort < r["seen"]["auroc"]
    with pytest.raises(ValueError, match="one row per image"):
        kind_aurocs(scores, labels, kinds[:-1], sev)


def test_auroc_ci_is_stratified_and_none_without_both_classes():
    s = np.r_[np.linspace(0, 1, 30), np.linspace(0.5, 1.5, 30)]
    y = np.r_[np.zeros(30), np.ones(30)]
    v, ci = auroc_with_ci(s, y, n_boot=300)
    assert ci[0] < v < ci[1] and 0.7 < v < 0.95
    assert auroc_with_ci(s[:30], y[:30])[1] is None and np.isnan(auroc_with_ci(s[:30], y[:30])[0])
    with pytest.raises(ValueError, match="no clean images"):
        benchmark_metrics(s[30:], y[30:], ["a"] * 30, np.ones(30), np.zeros((30, 2, 2)), np.zeros((30, 2, 2), bool))


def test_paired_wilcoxon_finds_a_consistent_difference():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.5, 1, 40)
    r = paired_wilcoxon(a, a - 0.1 + rng.normal(0, 0.01, 40))
    assert r["p"] < 1e-6 and r["median_diff"] == pytest.approx(0.1, abs=0.02) and r["n"] == 40
    assert paired_wilcoxon(a, a)["p"] == 1.0


def test_placement_values_average_to_the_auroc_and_the_comparison_is_paired():
    from medtrust.metrics.anomaly import _auroc, compare_detectors, placement_values

    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(80, int), np.ones(60, int)]
    good = y * 2.0 + rng.normal(size=140)
    weak = y * 0.5 + rng.normal(size=140)
    pv = placement_values(good, y)
    assert pv.shape == (60,) and pv.mean() == pytest.approx(_auroc(good, y))
    assert placement_values([1.0, 1.0], [0, 1])[0] == 0.5  # a tie counts half
    c = compare_detectors(good, weak, y, n_boot=300)
    lo, hi = c["diff_ci"]
    assert c["diff"] == pytest.approx(c["auroc_a"] - c["auroc_b"]) and 0 < lo <= c["diff"] <= hi
    assert c["wilcoxon"]["p"] < 0.01 and c["wilcoxon"]["median_diff"] > 0
    same = compare_detectors(good, good + 1e-9 * rng.normal(size=140), y, n_boot=300)
    assert same["diff_ci"][0] <= 0 <= same["diff_ci"][1] and same["wilcoxon"]["p"] > 0.05
    with pytest.raises(ValueError, match="injected and clean"):
        compare_detectors(good[:80], weak[:80], y[:80])
