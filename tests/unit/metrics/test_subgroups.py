"""Subgroup metrics: hand-checkable values, a planted TPR gap is found (CI excludes 0, small p),
no gap gives a CI that spans 0 and a large p, small groups are listed but not in the gaps."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import count

from medtrust.metrics.subgroups import (
    _metric_on,
    _pair_ci,
    _permutation_p,
    classification_metric_set,
    classification_subgroups,
    segmentation_subgroups,
    subgroup_report,
)


def _table(n=400, tpr_b=0.5, seed=0):
    rng = np.random.default_rng(seed)
    g = np.where(np.arange(n) < n // 2, "A", "B")
    y = rng.integers(0, 2, n)
    hit = rng.uniform(size=n) < np.where(g == "A", 0.9, tpr_b)
    pred = np.where(y == 1, hit.astype(int), (rng.uniform(size=n) < 0.1).astype(int))
    p1 = np.clip(np.where(pred == 1, 0.8, 0.2) + rng.normal(0, 0.05, n), 0, 1)
    return pd.DataFrame({"sex": g, "label": y, "pred": pred, "prob_1": p1, "confidence": np.maximum(p1, 1 - p1)})


def test_hand_computed_group_values():
    df = pd.DataFrame({"sex": ["F"] * 4 + ["M"] * 4, "label": [1, 1, 0, 0, 1, 1, 0, 0],
                       "pred": [1, 0, 0, 0, 1, 1, 1, 0], "prob_1": [.9, .4, .2, .1, .9, .8, .7, .1],
                       "confidence": [.9, .6, .8, .9, .9, .8, .7, .9]})
    rep = classification_subgroups(df, ["sex"], 2, min_group_size=2, n_boot=0)
    f, m = rep["attributes"]["sex"]["groups"]["F"], rep["attributes"]["sex"]["groups"]["M"]
    assert (f["n"], f["tpr"], f["fpr"], f["selection_rate"], f["accuracy"]) == (4, 0.5, 0.0, 0.25, 0.75)
    assert (m["n"], m["tpr"], m["fpr"], m["selection_rate"], m["accuracy"]) == (4, 1.0, 0.5, 0.75, 0.75)
    assert f["auroc"] == 1.0 and m["auroc"] == 1.0
    gaps = rep["attributes"]["sex"]["gaps"]
    assert gaps["tpr"]["gap"] == 0.5 and gaps["tpr"]["lowest"] == "F" and gaps["tpr"]["ratio"] == 0.5
    assert gaps["selection_rate"]["gap"] == 0.5 and "ci95" not in gaps["tpr"]


def test_a_planted_gap_is_found_and_its_ci_excludes_zero():
    rep = classification_subgroups(_table(tpr_b=0.5), ["sex"], 2, n_boot=200)
    gap = rep["attributes"]["sex"]["gaps"]["tpr"]
    assert gap["gap"] == pytest.approx(0.4, abs=0.1) and gap["lowest"] == "B"
    assert gap["ci95"][0] > 0.2 and gap["ci95"][0] < gap["gap"] < gap["ci95"][1] and gap["p_value"] < 0.01
    # no planted gap: the signed CI of the (highest - lowest) pair contains 0 and the permutation test
    # finds nothing (a CI of max - min itself would exclude 0 here: max - min is never negative)
    gap = classification_subgroups(_table(tpr_b=0.9), ["sex"], 2, n_boot=200)["attributes"]["sex"]["gaps"]["tpr"]
    assert gap["ci95"][0] < 0 < gap["ci95"][1] and gap["p_value"] > 0.1 and gap["gap"] < 0.1


def test_small_groups_are_listed_but_left_out_of_the_gaps():
    df = _table(n=60)
    df.loc[:2, "sex"] = "X"  # three images
    rep = classification_subgroups(df, ["sex"], 2, min_group_size=10, n_boot=0)
    a = rep["attributes"]["sex"]
    assert a["small_groups"] == ["X"] and a["groups"]["X"]["n"] == 3
    assert a["gaps"]["accuracy"]["lowest"] in ("A", "B") and a["gaps"]["accuracy"]["highest"] in ("A", "B")


def test_undefined_metrics_are_none_not_zero():
    df = _table(n=40)
    df.loc[df["sex"] == "A", "label"] = 0  # no positives in A: TPR / AUROC undefined there
    rep = classification_subgroups(df, ["sex"], 2, n_boot=0)
    assert rep["attributes"]["sex"]["groups"]["A"]["tpr"] is None
    assert rep["attributes"]["sex"]["groups"]["A"]["auroc"] is None


def test_segmentation_dice_by_group():
    per = pd.DataFrame({"tone": ["I"] * 12 + ["VI"] * 12, "dice": [0.9] * 12 + [0.6] * 11 + [np.nan],
                        "recall": [1.0] * 24})
    rep = segmentation_subgroups(per, ["tone"], n_boot=50)
    g = rep["attributes"]["tone"]
    assert g["groups"]["VI"]["dice"] == pytest.approx(0.6) and g["groups"]["I"]["n"] == 12
    assert g["gaps"]["dice"]["gap"] == pytest.approx(0.3) and g["gaps"]["dice"]["lowest"] == "VI"
    assert g["gaps"]["recall"]["gap"] == 0.0


def test_a_metric_undefined_in_every_group_has_no_gap_and_no_error():
    df = _table(n=60)
    df["label"] = 0  # no positives anywhere: TPR and AUROC undefined in every group
    gaps = classification_subgroups(df, ["sex"], 2, n_boot=20)["attributes"]["sex"]["gaps"]
    assert gaps["tpr"]["gap"] is None and gaps["tpr"]["lowest"] is None
    assert gaps["fpr"]["gap"] is not None


def test_attribute_frame_auto_list_none_and_a_missing_name():
    from medtrust.metrics.subgroups import attribute_frame

    recs = [{"attrs": {"sex": "F", "race": "A"}}, {"attrs": {"sex": "M"}}, {"attrs": {}}]
    auto = attribute_frame(recs)
    assert list(auto.columns) == ["race", "sex"] and list(auto["race"]) == ["A", "unknown", "unknown"]
    assert list(attribute_frame(recs, ["sex"]).columns) == ["sex"]
    assert attribute_frame(recs, []).shape == (3, 0)
    with pytest.raises(ValueError, match=r"\['age'\] not in the records' attributes \(present: \['race', 'sex'\]\)"):
        attribute_frame(recs, ["age"])


# --- scipy's bootstrap / permutation test against the hand-written loops they replaced -------------

def _reference_pair_ci(fn, params, name, y_true, y_pred, hi, lo, n_boot, rng):
    """``_pair_ci`` before scipy, verbatim."""
    vals = [_metric_on(fn, params, name, y_true, y_pred, rng.choice(hi, len(hi)))
            - _metric_on(fn, params, name, y_true, y_pred, rng.choice(lo, len(lo))) for _ in range(n_boot)]
    vals = [v for v in vals if np.isfinite(v)]
    if len(vals) < max(10, n_boot // 2):
        return [None, None]
    q = np.percentile(vals, [2.5, 97.5])
    return [float(q[0]), float(q[1])]


def _reference_permutation_p(fn, params, name, y_true, y_pred, groups, keep, observed, n_perm, rng):
    """``_permutation_p`` before scipy, verbatim."""
    if observed is None:
        return None
    idx = np.flatnonzero(keep)
    labels = groups[idx]
    names = np.unique(labels)
    hits, done = 0, 0
    for _ in range(n_perm):
        shuffled = rng.permutation(labels)
        vals = [_metric_on(fn, params, name, y_true, y_pred, idx[shuffled == g]) for g in names]
        vals = [v for v in vals if np.isfinite(v)]
        if len(vals) < 2:
            continue
        done += 1
        hits += (max(vals) - min(vals)) >= observed - 1e-12
    return float((hits + 1) / (done + 1)) if done else None


def _fast_tpr(y, p):  # the metric's cost is not under test: a cheap TPR instead of fairlearn's
    return float(np.mean(p[y == 1] == 1)) if (y == 1).any() else float("nan")


def _fast_acc(y, p):
    return float(np.mean(y == p))


def _gap_of(fn, y, p, groups):
    vals = [fn(y[groups == g], p[groups == g]) for g in np.unique(groups)]
    vals = [v for v in vals if np.isfinite(v)]
    return max(vals) - min(vals) if len(vals) >= 2 else None


def _both(fn, y, p, groups, hi, lo, n, seed=0):
    """(old CI, new CI, old p, new p) with the same seeds (different streams: scipy draws differently)."""
    keep = np.ones(len(y), bool)
    obs = _gap_of(fn, y, p, groups)
    mem = {g: np.flatnonzero(groups == g) for g in (hi, lo)}
    out = []
    for ci, perm in ((_reference_pair_ci, _reference_permutation_p), (_pair_ci, _permutation_p)):
        rng = np.random.default_rng([seed, 1])
        out.append((ci(fn, None, "m", y, p, mem[hi], mem[lo], n, rng),
                    perm(fn, None, "m", y, p, groups, keep, obs, n, rng)))
    return out[0][0], out[1][0], out[0][1], out[1][1]


def _p_tol(p, n):
    """4 s.d. of the difference of two independent Monte-Carlo p-values at n permutations, + 1/n."""
    return 4 * np.sqrt(2 * p * (1 - p) / n) + 1 / n


# Monte-Carlo s.d. of a 2.5 % / 97.5 % bound at 2000 resamples ~0.006 here (difference CIs ~0.2 wide on
# 100-200 images per group), ~0.008 for two independent runs: 0.03 is ~4 s.d.
@pytest.mark.parametrize("tpr_b,fn", [(0.9, _fast_tpr), (0.75, _fast_tpr), (0.6, _fast_tpr), (0.75, _fast_acc)])
def test_scipy_ci_and_p_value_match_the_old_loops(tpr_b, fn):
    df = _table(n=300, tpr_b=tpr_b, seed=1)
    y, p, g = df["label"].to_numpy(), df["pred"].to_numpy(), df["sex"].to_numpy()
    hi, lo = ("A", "B") if fn(y[g == "A"], p[g == "A"]) >= fn(y[g == "B"], p[g == "B"]) else ("B", "A")
    old_ci, new_ci, old_p, new_p = _both(fn, y, p, g, hi, lo, 2000)
    assert new_ci == pytest.approx(old_ci, abs=0.03)
    assert new_p == pytest.approx(old_p, abs=_p_tol(old_p, 2000))


@pytest.mark.parametrize("pos,hit", [
    # ~31 % of regroupings put both positives in one group, every other one has gap 1: p = 1; only ~42 %
    # of the resamples have a positive in both A and B: CI [None, None]
    ([0, 12], [0]),
    ([0, 1, 12], [12]),  # ~9 % undefined regroupings; p ~ 0.5
    ([0, 1, 2, 12, 13], [0, 12, 13]),  # ~10-35 % of each group's resamples have no positive
])
def test_undefined_resamples_and_permutations_are_handled_as_before(pos, hit):
    # three groups of 10 (C without positives), TPR of B (highest) vs A: a regrouping with TPR defined in
    # < 2 groups is left out of the count (scipy alone would count it as not more extreme and give
    # p ~ 0.69 in the first case); resamples without a positive are dropped from the CI
    y, p = np.zeros(30, int), np.zeros(30, int)
    y[pos], p[hit] = 1, 1
    g = np.repeat(["A", "B", "C"], 10)
    hi, lo = ("A", "B") if _fast_tpr(y[:10], p[:10]) > _fast_tpr(y[10:20], p[10:20]) else ("B", "A")
    old_ci, new_ci, old_p, new_p = _both(_fast_tpr, y, p, g, hi, lo, 2000)
    assert new_ci == pytest.approx(old_ci, abs=0.05) and new_p == pytest.approx(old_p, abs=_p_tol(old_p, 2000))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_known_truth_planted_tpr_gap_of_0_3_and_no_gap(seed):
    # 200 per group; TPR 0.9 vs 0.6: CI of the pair excludes 0 and p < 0.01; equal TPRs: CI spans 0, p > 0.1
    tpr = {"n": count, "tpr": classification_metric_set(True)["tpr"]}  # the reported TPR (fairlearn's), alone
    for tpr_b in (0.6, 0.9):
        df = _table(n=400, tpr_b=tpr_b, seed=seed)
        gap = subgroup_report(df[["sex"]], df["label"], df["pred"], tpr, n_boot=200, seed=seed)
        gap = gap["attributes"]["sex"]["gaps"]["tpr"]
        if tpr_b == 0.6:
            assert gap["lowest"] == "B" and gap["ci95"][0] > 0 and gap["p_value"] < 0.01
        else:
            assert gap["ci95"][0] < 0 < gap["ci95"][1] and gap["p_value"] > 0.1


def test_output_shapes_are_unchanged():
    gaps = classification_subgroups(_table(n=100), ["sex"], 2, n_boot=30)["attributes"]["sex"]["gaps"]
    for gp in gaps.values():
        assert len(gp["ci95"]) == 2 and all(v is None or isinstance(v, float) for v in gp["ci95"])
        assert gp["p_value"] is None or isinstance(gp["p_value"], float)
