"""Heatmap-relevance raters: agreement recovered from simulated raters of known noise and bias, the
correlation with a detector map, and bad CSVs named by row."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medtrust.anomaly.raters import agreement, correlation_with_map, read_region_ratings, simulate_region_raters


def _truth(n: int = 300, seed: int = 0):
    rng = np.random.default_rng(seed)
    return {(f"img{i}", "A"): float(rng.integers(1, 6)) for i in range(n)}


def test_agreement_falls_as_the_raters_noise_rises_and_is_one_without_noise():
    truth = _truth()
    alphas = []
    for sigma in (0.0, 0.5, 1.0, 2.0):
        df = simulate_region_raters(truth, [{"sigma": sigma}] * 3, seed=1)
        alphas.append(agreement(df, n_boot=50)["krippendorff"]["alpha"])
    assert alphas[0] == pytest.approx(1.0) and alphas[0] > alphas[1] > alphas[2] > alphas[3] > 0
    rng = np.random.default_rng(3)  # raters who ignore the truth: no agreement beyond chance (SE about 0.03 here)
    many = _truth(1000)
    df = simulate_region_raters({k: float(rng.integers(1, 6)) for k in many}, [{"sigma": 0}], seed=0)
    df2 = simulate_region_raters({k: float(rng.integers(1, 6)) for k in many}, [{"sigma": 0}], seed=0)
    both = pd.concat([df.assign(rater="a"), df2.assign(rater="b")])
    assert abs(agreement(both, n_boot=50)["krippendorff"]["alpha"]) < 0.1


def test_wilcoxon_finds_a_biased_rater_and_not_an_unbiased_one():
    df = simulate_region_raters(_truth(), [{"sigma": 0.5}, {"sigma": 0.5}, {"sigma": 0.5, "bias": 1.0}], seed=2)
    pairs = agreement(df, n_boot=20)["wilcoxon_pairs"]
    assert pairs["r1 vs r2"]["p"] > 0.01 and pairs["r1 vs r3"]["p"] < 1e-6 and pairs["r1 vs r3"]["median_diff"] < 0


def test_ratings_correlate_with_a_map_that_follows_the_truth():
    truth = _truth(200)
    df = simulate_region_raters(truth, [{"sigma": 0.5}] * 3, seed=4)
    rng = np.random.default_rng(5)
    good = {k: t + rng.normal(0, 0.3) for k, t in truth.items()}
    noise = {k: rng.normal() for k in truth}
    groups = {k[0]: ("a" if i % 2 else "b") for i, k in enumerate(truth)}
    r = correlation_with_map(df, good, groups)
    assert r["overall"]["rho"] > 0.8 and set(r["groups"]) == {"a", "b"} and r["missing"] == 0
    assert abs(correlation_with_map(df, noise)["overall"]["rho"]) < 0.2
    with pytest.raises(ValueError, match="no rated"):
        correlation_with_map(df, {("x", "y"): 1.0})


@pytest.mark.parametrize("text,msg", [
    ("image_id,rater,score\na,r1,3\n", "missing column(s) ['region']"),
    ("image_id,region,rater,score\na,A,r1,6\n", "row 1: score '6'; expected an integer 1-5"),
    ("image_id,region,rater,score\na,A,r1,3\nb,A,r1,x\n", "row 2: score 'x'"),
    ("image_id,region,rater,score\na,,r1,3\n", "row 1: blank ['region']"),
    ("image_id,region,rater,score\na,A,r1,3\na,A,r1,4\n", "row 2: rater 'r1' rates region 'A' of image 'a' twice"),
])
def test_bad_rating_csvs_name_the_row(tmp_path, text, msg):
    (tmp_path / "r.csv").write_text(text)
    with pytest.raises(ValueError) as err:
        read_region_ratings(tmp_path / "r.csv")
    assert msg in str(err.value) and "r.csv" in str(err.value)


def test_a_good_csv_round_trips(tmp_path):
    df = simulate_region_raters(_truth(10), [{"sigma": 0.3}] * 2, seed=0)
    df.to_csv(tmp_path / "r.csv", index=False)
    back = read_region_ratings(tmp_path / "r.csv")
    assert back["score"].tolist() == df["score"].tolist() and len(back) == 20
