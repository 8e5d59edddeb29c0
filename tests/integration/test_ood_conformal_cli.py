"""Out-of-distribution detection and conformal prediction sets of a classifier run, end to end."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from medtrust.data.phantoms.cxr import PhantomCxrSource
from medtrust.data.phantoms.derm import PhantomDermSource
from tests.conftest import refused, run_script, write_png
from tests.integration.test_classification_cli import TINY_CLS

pytestmark = pytest.mark.integration
FAST = ["evaluation.bootstrap=0", "evaluation.explanation_stability_samples=0", "evaluation.subgroups.bootstrap=0",
        "evaluation.figures=false"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("ood") / "run"
    run_script("train.py", *TINY_CLS, "data.source.n_images=160", "trainer.max_epochs=3",
               "data.splits.calibration_fraction=0.25", *FAST, f"hydra.run.dir={run}")
    return run


def _write(folder, records, n):
    for r in records[:n]:
        img = np.asarray(r["image"], dtype=np.uint8)
        write_png(folder / f"{r['id']}.png", img[..., 0] if img.shape[-1] == 1 else img)
    return folder


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("ood_sets")
    # same source, other seed: in distribution; dermoscopy phantoms (RGB, read as grayscale): out of it
    same = _write(root / "cxr_other_seed", PhantomCxrSource(n_images=60, size=32, seed=5).records(), 60)
    derm = _write(root / "derm", PhantomDermSource(n_images=40, size=48, seed=1).records(), 40)
    return {"same": same, "derm": derm}


def _latest(run):
    return sorted((run / "evaluations").iterdir())[-1]


def test_training_writes_what_conformal_and_ood_need(run):
    cal = json.loads((run / "calibration.json").read_text())
    n_cal = (pd.read_csv(run / "splits" / "splits.csv")["split"] == "cal").sum()
    cal_pred = pd.read_csv(run / "calibration_predictions.csv")
    assert len(cal_pred) == n_cal and {"label", "mc_dropout/scaled/p1", "deterministic/raw/p0"} <= set(cal_pred)
    assert (run / "ood_fit.safetensors").is_file()
    o = cal["ood"]
    assert {"msp", "energy", "mahalanobis", "mahalanobis_layers", "knn", "mc_mutual_information"} <= set(o["thresholds"])
    assert o["thresholds_fitted_on"].startswith("cal") and o["keep_in_distribution"] == 0.95
    test = json.loads((run / "metrics" / "test.json").read_text())
    c = test["conformal"]
    assert c["fitted_on"].startswith("cal") and c["reported_on"] == "test" and c["in_sample"] is False
    assert set(c["methods"]) == {"lac", "aps", "raps"}
    preds = pd.read_csv(run / "test_predictions.csv", keep_default_na=False)
    for m, block in c["methods"].items():
        hit = [str(y) in s.split("|") for y, s in zip(preds["label"], preds[f"set_{m}"])]
        assert block["coverage"] == pytest.approx(np.mean(hit))            # the column is what was scored
        assert block["mean_size"] == pytest.approx(np.mean([len(s.split("|")) if s else 0 for s in preds[f"set_{m}"]]))
    recal = pd.read_csv(run / "metrics" / "test_recalibration.csv")
    assert len(recal) == 2 * 5 and set(recal["recalibration"]) == {"none", "temperature", "histogram_binning",
                                                                    "isotonic", "beta"}
    own = pd.read_csv(run / "metrics" / "test_methods.csv")
    for _, r in own.iterrows():   # the none / temperature rows are the methods table's
        got = recal[(recal["method"] == r["method"]) &
                    (recal["recalibration"] == ("temperature" if r["temperature_scaled"] else "none"))]
        assert got["nll"].iloc[0] == pytest.approx(r["nll"])
    f = test["ood_flag"]
    assert f["detector"] == "mahalanobis_layers" and preds["ood_flag"].mean() == pytest.approx(f["flagged"])
    assert ((preds["ood_score"] > f["threshold"]) == preds["ood_flag"].astype(str).eq("True")).all()


def test_ood_sets_separate_known_out_from_known_in(run, sets):
    """Known truth both ways: dermoscopy phantoms are found (AUROC > 0.9 for the feature detectors), phantom
    CXRs of another seed of the training source are not (AUROC near 0.5)."""
    run_script("evaluate.py", f"run_dir={run}", f"ood.sets=[{sets['derm']},{sets['same']}]", *FAST)
    out = _latest(run)
    res = json.loads((out / "metrics" / "ood.json").read_text())
    derm, same = res["sets"]["derm"], res["sets"]["cxr_other_seed"]
    assert derm["n_images"] == 40 and derm["native_modes"] == {"RGB": 40} and derm["preprocessing"]["channels"] == 1
    assert derm["detectors"]["mahalanobis_layers"]["auroc"] > 0.9
    assert 0.2 < same["detectors"]["mahalanobis_layers"]["auroc"] < 0.8   # 17 test images: SD ~0.08
    table = pd.read_csv(out / "metrics" / "ood.csv")
    assert len(table) == 2 * len(res["detectors"]) and {"auroc", "fpr_at_95tpr"} <= set(table)
    scores = pd.read_csv(out / "metrics" / "ood_scores.csv")
    assert (scores["set"] == "derm").sum() == 40
    page = (out / "report" / "index.html").read_text()
    assert "Out-of-distribution" in page and "cxr_other_seed" in page


def test_bad_ood_sets_and_alpha_are_refused(run, tmp_path):
    (tmp_path / "empty").mkdir()
    r = refused("evaluate.py", f"run_dir={run}", f"ood.sets=[{tmp_path / 'empty'}]", *FAST)
    assert r.returncode != 0 and "holds no image" in r.stderr and "empty" in r.stderr
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    r = refused("evaluate.py", f"run_dir={run}", f"ood.sets=[{tmp_path / 'bad'}]", *FAST)
    assert r.returncode != 0 and "x.png" in r.stderr and "unreadable" in r.stderr
    r = refused("evaluate.py", f"run_dir={run}", f"ood.sets=[{tmp_path / 'missing'}]", *FAST)
    assert r.returncode != 0 and "does not exist" in r.stderr
    # the range itself (0, 1.5, ...) is tested on check_alpha (tests/unit/metrics/test_conformal.py)
    r = refused("evaluate.py", f"run_dir={run}", "evaluation.conformal.alpha=0", *FAST)
    assert r.returncode != 0 and "evaluation.conformal.alpha must lie in (0, 1)" in r.stderr
    r = refused("evaluate.py", f"run_dir={run}", "evaluation.conformal.alpha=0.001", *FAST)
    assert r.returncode != 0 and "too few for alpha=0.001" in r.stderr and "999" in r.stderr


def test_corruption_benchmark_prevalence_and_test_time_adaptation(run):
    run_script("evaluate.py", f"run_dir={run}", "shift=corruptions", "shift.only=[gaussian_noise]",
               "shift.severities=[5]", "shift.adapt_bn=true", "shift.label_shift=em", "shift.prevalence=[0.3,0.7]",
               "evaluation.bootstrap=0", "evaluation.explanation_stability_samples=0", "evaluation.subgroups.bootstrap=0")
    out = _latest(run)
    df = pd.read_csv(out / "metrics" / "shift_corruptions.csv")
    # (clean + 1 corruption x 1 severity) x 4 variants x (2 methods x with / without temperature) ...
    plain = df[df["recalibration"].isin(["none", "temperature"])]
    assert len(plain) == 2 * 4 * 4 and set(df["variant"]) == {"as trained", "adapt_bn", "em", "adapt_bn+em"}
    # ... and netcal's three recalibrators for each method in the variants without EM priors
    netcal = df[~df["recalibration"].isin(["none", "temperature"])]
    assert len(netcal) == 2 * 2 * 2 * 3 and set(netcal["recalibration"]) == {"histogram_binning", "isotonic", "beta"}
    df = plain
    # clean, as trained: the run's own test figures for every method (the same probabilities)
    own = pd.read_csv(run / "metrics" / "test_methods.csv")
    clean = df[(df["severity"] == 0) & (df["variant"] == "as trained")]
    for _, r in own.iterrows():
        got = clean[(clean["method"] == r["method"]) & (clean["temperature_scaled"] == r["temperature_scaled"])]
        assert got["ece_top_label"].iloc[0] == pytest.approx(r["ece_top_label"], abs=1e-6)
        assert got["accuracy"].iloc[0] == pytest.approx(r["accuracy"], abs=1e-9)
    noisy = df[(df["corruption"] == "gaussian_noise") & (df["severity"] == 5)]
    assert not np.allclose(noisy[noisy["variant"] == "adapt_bn"]["nll"], noisy[noisy["variant"] == "as trained"]["nll"])
    assert {"coverage_lac", "coverage_aps", "coverage_raps", "aleatoric", "epistemic"} <= set(df)
    res = json.loads((out / "metrics" / "shift.json").read_text())
    ranking = [r["mean_ece"] for r in res["headline"]["ranking"]]
    assert ranking == sorted(ranking) and res["headline"]["mean_ece"] == ranking[0]
    assert (out / "figures" / "shift" / "corruptions.png").is_file()
    prev = pd.DataFrame(res["prevalence"])
    assert set(prev["positive_share"]) == {0.3, 0.7} and set(prev["variant"]) == {"as trained", "em"}
    assert prev[prev["variant"] == "em"]["estimated_prior_1"].notna().all()
    # the evaluated split itself: adapted and EM-corrected, with every variant alongside
    test = json.loads((out / "metrics" / "test.json").read_text())
    assert test["shift"]["adapt_bn"]["batchnorm_layers"] > 0 and test["shift"]["label_shift"]["converged"]
    assert len(test["shift"]["variants"]) == 16
    page = (out / "report" / "index.html").read_text()
    assert "Under shift" in page and "Prevalence shift" in page


def test_shift_settings_are_checked(run, tiny_run):
    r = refused("evaluate.py", f"run_dir={run}", "shift=corruptions", "shift.only=[fog]", *FAST)
    assert r.returncode != 0 and "shift.only: ['fog'] not in shift.corruptions" in r.stderr
    r = refused("evaluate.py", f"run_dir={run}", "shift=corruptions", "shift.severities=[0,6]", *FAST)
    assert r.returncode != 0 and "shift.severities must be values in 1..5" in r.stderr
    r = refused("evaluate.py", f"run_dir={tiny_run}", "shift.adapt_bn=true")   # a segmenter
    assert r.returncode != 0 and "classifier runs do" in r.stderr
