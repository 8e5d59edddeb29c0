"""Statistics of the quality loop: paired share changes over prompts and the make-up of kept images."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medtrust.metrics.selection import cluster_mean_ci, kept_composition, paired_share_change, wilson


def test_paired_share_change_hand_computed():
    before = [0, 0, 1, 1, 0, 0, 1, 0]
    after = [1, 0, 1, 1, 1, 1, 1, 0]
    prompts = [0, 0, 1, 1, 2, 2, 3, 3]
    r = paired_share_change(before, after, prompts, n_boot=500, n_perm=999)
    assert r["before"] == pytest.approx(3 / 8) and r["after"] == pytest.approx(6 / 8)
    assert r["diff"] == pytest.approx(3 / 8) and r["n_prompts"] == 4
    assert r["discordant"] == {"gained": 3, "lost": 0}
    assert r["p_mcnemar"] == pytest.approx(0.25)  # binomial(3, 3, 0.5), two-sided
    lo, hi = r["diff_ci"]
    assert lo <= r["diff"] <= hi
    # per-prompt differences +1, 0, +2, 0: of the 4 sign patterns of the non-zero ones, 2 reach |3|
    assert r["p_permutation"] == pytest.approx(0.5)
    assert r["before_ci"] == wilson(3, 8)


def test_no_change_gives_a_ci_around_zero_and_p_one():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=200) < 0.5
    r = paired_share_change(x, x, np.arange(200) // 2, n_boot=300)
    assert r["diff"] == 0 and r["p_permutation"] == 1.0 and r["p_mcnemar"] == 1.0


def test_a_real_rise_is_found_and_its_ci_excludes_zero():
    rng = np.random.default_rng(1)
    before = rng.uniform(size=400) < 0.5
    after = before | (rng.uniform(size=400) < 0.4)  # only gains
    r = paired_share_change(before, after, np.arange(400) // 2, n_boot=500, n_perm=999)
    assert r["diff"] > 0.15 and r["diff_ci"][0] > 0 and r["p_permutation"] < 0.01


def test_cluster_ci_is_wider_than_an_image_ci_for_correlated_samples():
    rng = np.random.default_rng(2)
    per_prompt = rng.uniform(size=50) < 0.5
    values = np.repeat(per_prompt, 4).astype(float)  # 4 identical samples per prompt
    clustered = cluster_mean_ci(values, np.repeat(np.arange(50), 4), n_boot=500)
    naive = cluster_mean_ci(values, np.arange(200), n_boot=500)
    assert (clustered[1] - clustered[0]) > 1.5 * (naive[1] - naive[0])


def test_kept_composition_counts_shares_and_keep_rates():
    df = pd.DataFrame({"modality": ["cxr"] * 10 + ["ct"] * 10, "sex": ["F", "M"] * 10,
                       "kept": [1] * 8 + [0] * 2 + [1] * 2 + [0] * 8, "prompt_id": np.arange(20) // 2})
    r = kept_composition(df, ["modality", "sex", "absent"], n_boot=200, min_group_size=5)
    assert r["n"] == 20 and r["n_kept"] == 10 and set(r["attributes"]) == {"modality", "sex"}
    cxr = r["attributes"]["modality"]["groups"]["cxr"]
    assert cxr["share_all"] == 0.5 and cxr["share_kept"] == 0.8 and cxr["share_change"] == pytest.approx(0.3)
    assert cxr["keep_rate"] == 0.8 and r["attributes"]["modality"]["keep_rate_gap"] == pytest.approx(0.6)
    assert r["attributes"]["modality"]["chi2_p"] < 0.05
    lo, hi = cxr["share_change_ci"]
    assert 0 <= lo <= 0.3 <= hi
    sex = r["attributes"]["sex"]
    assert sex["groups"]["F"]["keep_rate"] == sex["groups"]["M"]["keep_rate"] == 0.5 and sex["keep_rate_gap"] == 0
    small = kept_composition(df, ["modality"], n_boot=0, min_group_size=11)["attributes"]["modality"]
    assert small["insufficient"] == ["ct", "cxr"] and small["keep_rate_gap"] is None


def test_kept_composition_with_truth_separates_the_images_from_the_filter():
    # group A: 8 of 10 images deserve keeping, group B: 4 of 10; the filter keeps 3 of 4 deserving images
    # in both (and nothing else): keep rates differ (0.6 vs 0.3), recalls do not
    truth = [1] * 8 + [0] * 2 + [1] * 4 + [0] * 6
    kept = [1, 1, 1, 1, 1, 1, 0, 0, 0, 0] + [1, 1, 1, 0] + [0] * 6
    df = pd.DataFrame({"group": ["A"] * 10 + ["B"] * 10, "kept": kept, "top": truth, "prompt_id": np.arange(20)})
    r = kept_composition(df, ["group"], n_boot=0, min_group_size=5, truth="top")["attributes"]["group"]
    a, b = r["groups"]["A"], r["groups"]["B"]
    assert (a["keep_rate"], b["keep_rate"]) == (0.6, 0.3) and r["keep_rate_gap"] == pytest.approx(0.3)
    assert (a["truth_rate"], b["truth_rate"]) == (0.8, 0.4) and (a["n_truth"], b["n_truth"]) == (8, 4)
    assert a["recall"] == b["recall"] == 0.75 and r["recall_gap"] == 0
    assert a["recall_ci"] == wilson(6, 8)
    # a filter that drops B's deserving images shows in the recall gap
    df.loc[df.group == "B", "kept"] = 0
    r = kept_composition(df, ["group"], n_boot=0, min_group_size=5, truth="top")["attributes"]["group"]
    assert r["groups"]["B"]["recall"] == 0 and r["recall_gap"] == pytest.approx(0.75)
    assert "recall" not in kept_composition(df, ["group"], n_boot=0)["attributes"]["group"]["groups"]["A"]
