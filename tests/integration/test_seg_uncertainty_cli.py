"""Segmenter: conformal risk control of the FNR and pixel uncertainty, end to end (train.py, evaluate.py)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tests.conftest import TINY_MODEL, refused, run_script

pytestmark = pytest.mark.integration
DATA = ["data.source.n_images=72", "data.source.size=32", "data.splits.calibration_fraction=0.3"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("segu") / "run"
    run_script("train.py", *TINY_MODEL, *DATA, "trainer.max_epochs=3", f"hydra.run.dir={run}")
    return run


def test_crc_is_fitted_on_cal_and_reported_on_test(run):
    th = json.loads((run / "threshold.json").read_text())
    assert th["fitted_on"] == "cal" and th["conformal_fnr_curves"]["fitted_on"] == "cal"
    assert (run / "conformal_fnr_curves.safetensors").is_file()
    m = json.loads((run / "metrics" / "test.json").read_text())
    c = m["conformal_fnr"]
    assert c["alpha"] == 0.3 and c["fitted_on"].startswith("cal") and c["reported_on"] == "test" and not c["in_sample"]
    assert c["bound_on_fitted"] <= 0.3
    # the model-threshold block is the per-image table's recall: the same numbers, two ways
    per = pd.read_csv(run / "metrics" / "test_per_image.csv")
    lesion = per[per["gt_fraction"] > 0]
    assert c["model"]["n_lesion"] == len(lesion)
    assert c["model"]["fnr_mean"] == pytest.approx((1 - lesion["recall"]).mean(), abs=1e-6)
    # a lower threshold can only lower the FNR
    if c["conformal"]["threshold"] <= c["model"]["threshold"]:
        assert c["conformal"]["fnr_mean"] <= c["model"]["fnr_mean"] + 1e-9


def test_pixel_uncertainty_is_written_and_reproducible(run):
    m = json.loads((run / "metrics" / "test.json").read_text())
    u = m["uncertainty"]
    assert u["mc_passes"] == 2 and u["flip_views"] == 2 and u["samples"] == 4
    assert set(u["pixel_error_auroc"]) == {"entropy", "mutual_information", "expected_entropy"}
    per = pd.read_csv(run / "metrics" / "test_per_image.csv")
    assert {"mean_entropy", "mean_expected_entropy", "mean_mutual_information"} <= set(per)
    assert (per["mean_entropy"] >= per["mean_mutual_information"] - 1e-6).all()   # MI is a part of the total
    qc = pd.read_csv(run / "metrics" / "test_qc_curve.csv")
    assert len(qc) == 8 and qc["dice_kept"].iloc[0] == pytest.approx(per["dice"].mean())
    assert (qc["dice_kept_oracle"] >= qc["dice_kept"] - 1e-9).all()
    b = pd.read_csv(run / "metrics" / "test_boundary.csv")
    assert b["n_pixels"].sum() == len(per) * 32 * 32 and set(b["side"]) == {"inside", "outside"}
    for f in ("qc_curve.png", "boundary_confidence.png", "uncertainty_maps.png"):
        assert (run / "figures" / "test" / f).is_file()
    assert "Pixel uncertainty" in (run / "report" / "index.html").read_text()
    run_script("evaluate.py", f"run_dir={run}", "evaluation.bootstrap=0")
    again = json.loads((sorted((run / "evaluations").iterdir())[-1] / "metrics" / "test.json").read_text())
    assert again["uncertainty"]["pixel_error_auroc"] == pytest.approx(u["pixel_error_auroc"], abs=1e-6)  # seeded masks
    assert again["conformal_fnr"]["conformal"] == m["conformal_fnr"]["conformal"]


def test_alpha_is_refitted_at_evaluation_and_bad_alpha_is_refused(run):
    run_script("evaluate.py", f"run_dir={run}", "evaluation.conformal.alpha=0.5", "evaluation.bootstrap=0",
               "evaluation.uncertainty.enabled=false")
    m = json.loads((sorted((run / "evaluations").iterdir())[-1] / "metrics" / "test.json").read_text())
    base = json.loads((run / "metrics" / "test.json").read_text())["conformal_fnr"]
    assert m["conformal_fnr"]["alpha"] == 0.5 and "uncertainty" not in m
    assert m["conformal_fnr"]["threshold"] >= base["threshold"]        # a looser FNR allows a higher threshold
    n_cal = json.loads((run / "threshold.json").read_text())["conformal_fnr_curves"]["n_lesion"]
    r = refused("evaluate.py", f"run_dir={run}", "evaluation.conformal.alpha=0.01")
    assert r.returncode != 0 and f"{n_cal} calibration image(s) are too few for alpha=0.01" in r.stderr
    assert "99" in r.stderr
    r = refused("evaluate.py", f"run_dir={run}", "evaluation.conformal.alpha=1")
    assert r.returncode != 0 and "evaluation.conformal.alpha must lie in (0, 1)" in r.stderr
    r = refused("train.py", *TINY_MODEL, "evaluation.conformal.alpha=-1")
    assert r.returncode != 0 and "evaluation.conformal.alpha must lie in (0, 1)" in r.stderr
    assert "Epoch" not in r.stderr                                      # refused before training


def test_explain_glassbox_batches_and_compare_on_batch_a(run, tmp_path):
    out = tmp_path / "ex"
    run_script("explain.py", f"run_dir={run}", "batch=c", "n_images=2", f"hydra.run.dir={out}")
    res = json.loads((out / "metrics" / "explanations.json").read_text())
    per = pd.read_csv(run / "metrics" / "test_per_image.csv")
    worst = list(np.argsort(per["dice"].to_numpy(), kind="stable")[:2])
    assert res["batch"]["name"] == "c" and res["batch"]["indices"] == [int(i) for i in worst] and res["n_images"] == 2
    r = refused("explain.py", f"run_dir={run}", "batch=d", f"hydra.run.dir={tmp_path / 'bad'}")
    assert r.returncode != 0 and "batch must be a, b or c" in r.stderr
    run_script("evaluate.py", f"run_dirs=[{run},{run}]", "evaluation.compare_on=a", "n_compare=3",
               f"hydra.run.dir={tmp_path / 'cmp'}")
    assert (tmp_path / "cmp" / "figures" / "comparison" / "comparison.png").is_file()
    table = pd.read_csv(tmp_path / "cmp" / "comparison.csv")      # each run's own trust figures beside its metrics
    own = json.loads((run / "metrics" / "test.json").read_text())
    assert table["own_crc_fnr"].tolist() == pytest.approx([own["conformal_fnr"]["conformal"]["fnr_mean"]] * 2)
    assert table["own_pixel_error_auroc_mutual_information"].iloc[0] == pytest.approx(
        own["uncertainty"]["pixel_error_auroc"]["mutual_information"])
    assert (table["parameters"] > 1000).all()
    # the same run twice: a paired difference of exactly 0, no test possible
    assert table["dice_diff_vs_first"].iloc[1] == 0 and np.isnan(table["dice_diff_wilcoxon_p"].iloc[1])
    r = refused("evaluate.py", f"run_dirs=[{run},{run}]", "evaluation.compare_on=z",
                f"hydra.run.dir={tmp_path / 'cmp2'}")
    assert r.returncode != 0 and "evaluation.compare_on must be differ, a, b or c" in r.stderr


def test_test_time_preprocessing_table(run, tmp_path):
    out = tmp_path / "pp"
    run_script("evaluate.py", f"run_dir={run}", "shift=preprocessing", "evaluation.uncertainty.enabled=false",
               "evaluation.bootstrap=0", f"hydra.run.dir={out}")
    df = pd.read_csv(out / "metrics" / "shift_preprocessing.csv")
    assert len(df) == 16 and df["applied"].all()                   # clean + 15 (RGB phantom: colour ones apply)
    test = json.loads((out / "metrics" / "test.json").read_text())
    clean = df[df["augmentation"] == "none (clean)"].iloc[0]
    for k in ("iou", "precision", "recall", "f1"):                 # the clean row is the evaluation's own figures
        assert clean[k] == pytest.approx(test["seg"][k], abs=1e-9)
    row = df.set_index("augmentation")
    assert (row["delta_dice"] == row["dice"] - clean["dice"]).all() or np.allclose(row["delta_dice"], row["dice"] - clean["dice"])
    assert not np.allclose(row.loc["erosion", ["dice", "precision", "recall"]].astype(float),
                           clean[["dice", "precision", "recall"]].astype(float))   # it did change the images
    assert "Effect of test-time preprocessing" in (out / "report" / "index.html").read_text()
    r = refused("evaluate.py", f"run_dir={run}", "shift=corruptions", f"hydra.run.dir={tmp_path / 'bad'}")
    assert r.returncode != 0 and "segmenter runs have the preprocessing benchmark" in r.stderr
