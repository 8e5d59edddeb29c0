"""Subgroup metrics: hand-checkable values, a planted TPR gap is found (CI excludes 0, small p),
no gap gives a CI that spans 0 and a large p, small groups are listed but not in the gaps."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medtrust.metrics.subgroups import classification_subgroups, segmentation_subgroups


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
