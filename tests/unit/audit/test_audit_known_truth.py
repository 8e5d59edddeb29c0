"""The audit on known truth: the prompt set, the phantom generator's injected bias and hallucinations, and
the audit's figures (audit_metrics) recovering them through simulated classifiers of known sensitivity
and false-positive rate (the CNN classifiers' own run is tested in tests/integration/test_audit_cli.py)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from medtrust.audit.generators import PhantomGenerator
from medtrust.audit.prompts import build_prompt_set, check_prompt_table
from medtrust.audit.run import audit_metrics, selector_block

PROMPTS = {
    "attributes": {"sex": {"F": "female", "M": "male"},
                   "race": {"White": "White", "Black": "Black", "Hispanic": "Hispanic", "Asian": "Asian"}},
    "template": "Chest X-ray of a {race} {sex} patient. {finding}",
    "neutral_template": "Chest X-ray. {finding}",
    "finding_text": "Opacity in the {side} lower lung.", "no_finding_text": "No acute process.",
    "per_cell": 4, "finding_share": 0.5, "seed": 0}
A = {"min_cell": 20, "n_boot": 1000, "n_perm": 500, "seed": 0, "intersections": True, "consensus": "majority"}


def test_prompt_pairs_differ_only_in_their_demographic_terms():
    df = build_prompt_set(PROMPTS)
    assert len(df) == 2 * 4 * 4 * 2 and set(df.variant) == {"demographic", "neutral"}
    for _, pair in df.groupby("pair_id"):
        d, n = pair[pair.variant == "demographic"].iloc[0], pair[pair.variant == "neutral"].iloc[0]
        assert d.seed == n.seed and d.asked == n.asked and d.race == n.race and d.sex == n.sex
        assert d.prompt.endswith(n.prompt.removeprefix("Chest X-ray. ")) and d.race in d.prompt
        assert "female" not in n.prompt and d.race not in n.prompt
    assert df.asked.mean() == 0.5
    assert build_prompt_set(PROMPTS).equals(df)  # reproducible


@pytest.mark.parametrize("change, match", [
    ({"template": "Chest X-ray of a {sex} patient. {finding}"}, "missing from the template"),
    ({"template": "X-ray of a {race} {sex} {eyes}. {finding}"}, "neither attributes"),
    ({"neutral_template": "Chest X-ray of a {sex}. {finding}"}, "may only use"),
])
def test_bad_prompt_templates_are_refused(change, match):
    with pytest.raises(ValueError, match=match):
        build_prompt_set({**PROMPTS, **change})


def test_a_prompt_table_missing_a_declared_attribute_names_it():
    df = build_prompt_set(PROMPTS).drop(columns=["race"])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['race'\]"):
        check_prompt_table(df, ["sex", "race"], "prompts.csv")
    df = build_prompt_set(PROMPTS)
    df.loc[3, "sex"] = ""
    with pytest.raises(ValueError, match="prompts.csv row 5: sex is blank"):
        check_prompt_table(df, ["sex", "race"], "prompts.csv")


def test_the_phantom_generator_injects_what_it_is_told_and_keeps_pairs_identical_elsewhere():
    df = build_prompt_set({**PROMPTS, "per_cell": 40})
    gen = PhantomGenerator(size=32, seed=0, inject={"tpr": {"race": {"Hispanic": 0.5}}, "hallucination": 0.4})
    imgs, t = gen.generate(df)
    assert imgs.shape == (len(df), 1, 32, 32)
    # a drawn opacity changes the image: same seed and anatomy, with and without the requested finding
    one = df.iloc[[0]].assign(asked=1)
    with_f, _ = PhantomGenerator(size=32, seed=0).generate(one)
    without, _ = PhantomGenerator(size=32, seed=0).generate(one.assign(asked=0))
    assert float((with_f - without).abs().sum()) > 1.0 and float(imgs.std()) > 0.05
    asked = t[(t.asked == 1) & (t.variant == "demographic")]
    drawn = asked.groupby("race").truth_finding.mean()
    assert drawn.drop("Hispanic").eq(1.0).all() and 0.3 < drawn["Hispanic"] < 0.7
    assert (t[(t.asked == 1) & (t.variant == "neutral")].truth_finding == 1).all()  # it cannot know an unnamed group
    assert (t[t.asked == 0].truth_finding == 0).all() and 0.33 < t.truth_hallucination.mean() < 0.47
    # a pair's two images are identical unless the injected bias acted on the named group
    for _, pair in t.groupby("pair_id"):
        i, j = pair.index
        same = bool(torch.equal(imgs[i], imgs[j]))
        assert same == (pair.truth_finding.nunique() == 1)
    assert gen.render_seed >= 1_000_000  # never a phantom_cxr data seed: no anatomy shared with training or real images
    again, _ = PhantomGenerator(size=32, seed=0, inject={"tpr": {"race": {"Hispanic": 0.5}}, "hallucination": 0.4}).generate(df)
    assert torch.equal(imgs, again)
    with pytest.raises(ValueError, match="not prompt attributes"):
        PhantomGenerator(inject={"tpr": {"religion": {"x": 0.5}}}).check_attributes(["sex", "race"])
    with pytest.raises(ValueError, match="probability"):
        PhantomGenerator(inject={"hallucination": 1.5})


def _classifier(truth: np.ndarray, sens: float, fpr: float, rng: np.random.Generator,
                pairs: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Flags of a classifier of known sensitivity and false-positive rate; with ``pairs`` it is deterministic
    like a network: the two identical images of a pair (same pair, same truth) get the same call."""
    u = rng.random(len(truth)) if pairs is None else rng.random((int(pairs.max()) + 1, 2))[pairs, truth]
    flag = np.where(truth == 1, u < sens, u < fpr).astype(float)
    p = np.where(flag == 1, 0.8, 0.2)
    return {"p": p, "flag": flag, "entropy": np.full(len(truth), 0.5), "mi": np.full(len(truth), 0.01)}


def _audit(tpr_gap: float, hall: float, seed: int, per_cell: int = 60):
    rng = np.random.default_rng(seed)
    df = build_prompt_set({**PROMPTS, "per_cell": per_cell, "seed": seed})
    gen = PhantomGenerator(size=16, seed=seed, inject={"tpr": {"race": {"Hispanic": 1 - tpr_gap}}, "hallucination": hall})
    _, t = gen.generate(df)
    real = pd.DataFrame({"pneumonia": (rng.random(600) < 0.4).astype(int), "covid": (rng.random(600) < 0.3).astype(int),
                         "sex": rng.choice(["F", "M"], 600), "race": rng.choice(["White", "Black", "Hispanic", "Asian"], 600)})
    sens, fpr = 0.92, 0.06
    pairs = t.pair_id.to_numpy()
    gen_f = {"pn": _classifier(t.truth_finding.to_numpy(), sens, fpr, rng, pairs)}
    real_f = {"pn": _classifier(real.pneumonia.to_numpy(), sens, fpr, rng)}
    gen_h = {f"cv{k}": _classifier(t.truth_hallucination.to_numpy(), 0.95, 0.03, rng, pairs) for k in range(3)}
    real_h = {f"cv{k}": _classifier(real.covid.to_numpy(), 0.95, 0.03, rng) for k in range(3)}
    return audit_metrics(t, gen_f, gen_h, real, real_f, real_h, "pneumonia", "covid", ["sex", "race"], A)


def test_the_audit_recovers_a_20_point_gap_and_a_40_percent_hallucination_rate():
    m = _audit(0.2, 0.4, seed=0)
    race = m["bias"]["race"]
    assert race["lowest"] == "Hispanic" and race["p"] < 0.05
    assert race["corrected"]["gap_ci"][0] <= 0.2 <= race["corrected"]["gap_ci"][1]
    h = m["hallucination"]
    assert h["corrected_ci"][0] <= 0.4 <= h["corrected_ci"][1] and h["excess_ci"][0] > 0.2
    assert set(h["per_classifier"]) == {"cv0", "cv1", "cv2"} and len(h["agreement"]["cohen_kappa"]) == 3
    # the neutral prompts carry no bias: the generator could not know the group
    assert m["bias_neutral"]["race"]["gap_ci"][0] <= 0 <= m["bias_neutral"]["race"]["gap_ci"][1]
    # naming the group lowers Hispanic prompts' selection rate against their counterfactuals, nobody else's
    s = m["selection_rate_shift"]
    assert s["race=Hispanic"]["shift_ci"][1] < 0 and s["race=White"]["shift"] == 0
    assert m["truth"]["drawn_gap.race"] == pytest.approx(0.2, abs=0.1)
    v = m["validity"]
    assert set(v) == {"all", "pneumonia", "no_pneumonia"} and {"real", "synthetic"} <= set(v["all"]["overall"])
    assert v["all"]["race=Hispanic"]["synthetic"]["n"] == 2 * 60 * 2  # both sexes, both variants


def test_with_nothing_injected_the_cis_cover_zero():
    m = _audit(0.0, 0.0, seed=1)
    for attr in ("sex", "race", "sex&race"):
        lo, hi = m["bias"][attr]["gap_ci"]
        assert lo <= 0 <= hi, attr
    h = m["hallucination"]
    assert h["excess_ci"][0] <= 0 <= h["excess_ci"][1] and h["corrected_ci"][0] <= 0 <= h["corrected_ci"][1]
    assert all(v["shift"] == 0 for v in m["selection_rate_shift"].values() if v.get("status") == "ok")


def test_small_cells_are_insufficient_never_rates():
    m = _audit(0.2, 0.4, seed=2, per_cell=6)  # 6 prompts per sex x race cell: 3 ask for the finding
    tpr = m["bias"]["sex&race"]["metrics"]["tpr"]["groups"]
    assert all(g == {"status": "insufficient", "n": 3} for g in tpr.values())
    assert m["bias"]["sex&race"]["gap"] is None


def test_the_selector_audit_recovers_an_injected_keep_rate_gap():
    """A selector that keeps women's images 70 % of the time and men's always: the audit's keep-rate gap
    and the shift in women's share of the kept images say so, with a chi-square p."""
    df = build_prompt_set({**PROMPTS, "per_cell": 40})
    _, t = PhantomGenerator(size=16, inject={"keep": {"sex": {"F": 0.7}}}).generate(df)
    s = selector_block(t, ["sex", "race"], A, "every generated image (kept or not)")
    sex = s["attributes"]["sex"]
    assert sex["chi2_p"] < 1e-4 and sex["keep_rate_gap"] == pytest.approx(0.3, abs=0.06)
    assert sex["groups"]["M"]["keep_rate"] == 1.0 and sex["groups"]["F"]["share_kept"] < 0.5
    assert s["attributes"]["race"]["chi2_p"] > 0.001  # race was not targeted
    assert "kept" not in PhantomGenerator(size=16).generate(df.head(4))[1]


def test_training_data_that_cannot_be_read_is_reported_unavailable_not_a_crash():
    """A generator run received from elsewhere whose training manifest is not on this machine: the audit
    says so in training_data (with the reason) instead of failing after minutes of sampling."""
    from medtrust.audit.run import training_data
    from medtrust.data.records import DataError

    class Moved:
        def training_composition(self):
            raise DataError("manifest not found: /elsewhere/manifest.csv")

    class Here:
        def training_composition(self):
            return {"status": "ok", "n": 3}

    assert training_data(Moved()) == {"status": "unavailable", "reason": "manifest not found: /elsewhere/manifest.csv"}
    assert training_data(Here()) == {"status": "ok", "n": 3}
