"""Classifier end to end: train (MC dropout, temperature scaling), evaluate, unlabelled images."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tests.conftest import SHARED_DATA, refused, run_script, write_png

pytestmark = pytest.mark.integration
TINY_CLS = ["experiment=tmv_mc_dropout", "data.source.n_images=80", "data.source.size=32", "data.image_size=[32,32]",
            "trainer.max_epochs=2", "model.mc_samples=4", "evaluation.bootstrap=50", "threads=1",
            "evaluation.explanation_stability_samples=3", "evaluation.explanation_stability_layer=net.backbone.layer2"]
# chance AUROC on 81 images is 0.5 with an SD of about 0.065: a broken model stays below 0.65, while
# 3 epochs at 32 px reach 0.73 (deterministic for the fixed seed)
KERMANY_AUROC_FLOOR = 0.65


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cls") / "run"
    run_script("train.py", *TINY_CLS, "data.splits.calibration_fraction=0.25", f"hydra.run.dir={run}")
    return run


def test_classifier_run_folder(cls_run):
    cal = json.loads((cls_run / "calibration.json").read_text())
    assert cal["fitted_on"] == "cal" and set(cal["temperatures"]) == {"deterministic", "mc_dropout"}
    splits = pd.read_csv(cls_run / "splits" / "splits.csv")
    assert cal["n_images"] == (splits["split"] == "cal").sum() > 0
    assert cal["primary_method"] == "mc_dropout" and 0 < cal["quadrant_threshold"] <= 1
    m = json.loads((cls_run / "metrics" / "test.json").read_text())
    assert {"auroc", "accuracy", "f1", "pr_auc", "ece_top_label", "ece_top_label_adaptive", "ece_positive", "brier",
            "nll", "aurc"} <= set(m["cls"])
    assert m["ci95"]["ece_top_label"][0] <= m["ci95"]["ece_top_label"][1]
    # fitted on cal, reported on test: out of sample, and said so
    assert m["calibration"]["fitted_on"] == "cal" and m["calibration"]["in_sample"] is False and m["in_sample"] == []
    assert sum(m["quadrants"]["counts"].values()) == m["n_images"]
    st = m["quadrants"]["stability"]  # third axis: correct x confident x stable explanation
    assert sum(st["counts"].values()) == m["n_images"] and len(st["counts"]) == 12
    assert sum(v for k, v in st["counts"].items() if k.endswith("_undefined")) < m["n_images"]
    assert "spearman_rho" in st["vs_uncertainty_and_correctness"]
    methods = pd.read_csv(cls_run / "metrics" / "test_methods.csv")
    assert set(zip(methods["method"], methods["temperature_scaled"])) == {
        ("deterministic", False), ("deterministic", True), ("mc_dropout", False), ("mc_dropout", True)}
    logged = pd.read_csv(cls_run / "csv" / "metrics.csv")
    assert {"val/cal/ece_positive", "val/cal/ece_top_label", "val/cls/ece_top_label"} <= set(logged)
    preds = pd.read_csv(cls_run / "test_predictions.csv")
    assert {"path", "patient_id", "label", "prob_1", "entropy", "mutual_information", "variance", "quadrant",
            "explanation_stability", "quadrant_stability"} <= set(preds)
    assert (cls_run / "failure_cases" / "test" / "index.csv").is_file()
    # the phantom's sensitive attributes travel with each prediction and give per-group metrics
    assert {"sex", "age_group", "race"} <= set(preds)
    sub = json.loads((cls_run / "metrics" / "test.json").read_text())["subgroups"]["attributes"]
    assert sum(g["n"] for g in sub["sex"]["groups"].values()) == len(preds)
    table = pd.read_csv(cls_run / "metrics" / "test_subgroups.csv")
    assert set(table["attribute"]) >= {"sex", "age_group", "race"} and table.groupby("attribute")["n"].sum().eq(len(preds)).all()
    # the report shows them, and the failure cases as embedded thumbnails
    page = (cls_run / "report" / "index.html").read_text()
    assert "Subgroups (test)" in page and "<h3>sex</h3>" in page
    trust = page.split("<h2>Trust summary</h2>")[1].split("<h2>")[0]
    for axis in ("accuracy", "calibration", "subgroups", "explanations"):
        assert f"<td>{axis}</td>" in trust, axis
    assert "ECE (top-label, as reported)" in trust and "cal (" in trust  # what it was fitted on
    n_cases = len(pd.read_csv(cls_run / "failure_cases" / "test" / "index.csv"))
    section = page.split("<h2>Failure cases (test)</h2>")[1].split("<h2>")[0]
    assert n_cases > 0 and section.count("data:image/png;base64") == n_cases
    for f in ("reliability.png", "risk_coverage.png", "uncertainty_hist.png", "trust_quadrants.png"):
        assert (cls_run / "figures" / "test" / f).is_file()


def test_evaluate_reproduces_and_writes_predictions(cls_run):
    run_script("evaluate.py", f"run_dir={cls_run}")
    out = sorted((cls_run / "evaluations").iterdir())[-1]
    got = json.loads((out / "metrics" / "test.json").read_text())
    want = json.loads((cls_run / "metrics" / "test.json").read_text())
    assert got["cls"]["auroc"] == pytest.approx(want["cls"]["auroc"], abs=1e-6)
    assert got["temperature"] == pytest.approx(want["temperature"])
    assert len(pd.read_csv(out / "test_predictions.csv")) == want["n_images"]


def test_split_all_scores_every_image_of_a_run_with_a_calibration_split(cls_run):
    """split=all failed for runs trained with data.splits.calibration_fraction > 0 (a calibration
    split cannot be carved from an empty train split)."""
    run_script("evaluate.py", f"run_dir={cls_run}", "split=all", "evaluation.bootstrap=0",
               "evaluation.explanation_stability_samples=0", "evaluation.subgroups.bootstrap=0")
    res = json.loads((sorted((cls_run / "evaluations").iterdir())[-1] / "metrics" / "test.json").read_text())
    assert res["n_images"] == 80 and res["calibration"]["fitted_on"] == "cal"
    # every row includes the training and calibration images: said, and no verdict given
    assert res["contains_training_images"] is True and res["in_sample"]
    page = (sorted((cls_run / "evaluations").iterdir())[-1] / "report" / "index.html").read_text()
    trust = page.split("<h2>Trust summary</h2>")[1].split("<h2>")[0]
    assert "<td>meets</td>" not in trust and "<td>fails</td>" not in trust and "<td>in-sample</td>" in trust


def test_unlabelled_folder_gets_predictions_only(cls_run, tmp_path):
    rng = np.random.default_rng(0)
    for i in range(5):
        write_png(tmp_path / "unl" / "images" / f"x{i}.png", rng.integers(0, 255, (40, 40), dtype=np.uint8))
    run_script("evaluate.py", f"run_dir={cls_run}", "data=folder", f"data.root={tmp_path / 'unl'}", "split=all")
    out = sorted((cls_run / "evaluations").iterdir())[-1]
    preds = pd.read_csv(out / "test_predictions.csv")
    assert len(preds) == 5 and "label" not in preds and {"prob_1", "entropy", "mutual_information"} <= set(preds)
    res = json.loads((out / "metrics" / "test.json").read_text())
    assert res["labelled"] is False and "cls" not in res


@pytest.mark.shared_data
@pytest.mark.skipif(not (SHARED_DATA / "pediatric_pneumonia_cxr_kermany" / "manifest.csv").exists(),
                    reason="../shared/data/pediatric_pneumonia_cxr_kermany not present")
def test_kermany_manifest_as_it_is(tmp_path):
    run = tmp_path / "kermany"
    run_script("train.py", "experiment=tmv_kermany", "data.image_size=[32,32]", "trainer.max_epochs=3",
               "model.mc_samples=2", "evaluation.bootstrap=20", "threads=1", f"hydra.run.dir={run}")
    val = json.loads((run / "metrics" / "val.json").read_text())
    assert val["n_images"] == 81 and val["cls"]["auroc"] >= KERMANY_AUROC_FLOOR


def _copy_run(run, dest, edit=None, split_sha=None):
    """A copy of a run folder with its saved config edited (the refusals read only configs and
    splits, so no training is needed to test them)."""
    import shutil

    from omegaconf import OmegaConf

    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("evaluations", "explanations"))
    if edit:
        cfg = OmegaConf.load(dest / ".hydra" / "config.yaml")
        for key, value in edit.items():
            OmegaConf.update(cfg, key, value)
        (dest / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    if split_sha:
        info = json.loads((dest / "splits" / "splits.json").read_text())
        (dest / "splits" / "splits.json").write_text(json.dumps({**info, "sha256": split_sha}))
    return dest


def test_ensemble_assembled_from_run_folders_and_mismatch_refused(cls_run, tmp_path):
    other = tmp_path / "other"  # another training seed: the split is the data set's (data.splits.seed), shared
    run_script("train.py", *TINY_CLS, "data.splits.calibration_fraction=0.25", "seed=7", "trainer.max_epochs=1",
               f"hydra.run.dir={other}")
    assert json.loads((other / "splits" / "splits.json").read_text())["sha256"] == \
        json.loads((cls_run / "splits" / "splits.json").read_text())["sha256"]
    out = tmp_path / "ens"
    run_script("evaluate.py", f"ensemble_runs=[{cls_run},{other}]", f"hydra.run.dir={out}")
    res = json.loads((out / "metrics" / "test.json").read_text())
    assert res["method"] == "ensemble" and len(res["ensemble_runs"]) == 2
    assert "ensemble" in json.loads((out / "calibration.json").read_text())["temperatures"]
    bigger = _copy_run(cls_run, tmp_path / "bigger", {"data.image_size": [40, 40]})
    proc = refused("evaluate.py", f"ensemble_runs=[{cls_run},{bigger}]", f"hydra.run.dir={tmp_path / 'bad'}")
    assert proc.returncode != 0 and "runs differ in data.image_size" in proc.stderr
    # a member trained on another split of the same data (e.g. data.splits.seed=7): one member's training
    # patients would be scored as the other's test images -> refused, naming the split digests
    leaky = _copy_run(cls_run, tmp_path / "leaky", split_sha="0" * 64)
    for key in ("ensemble_runs", "run_dirs"):
        proc = refused("evaluate.py", f"{key}=[{cls_run},{leaky}]", f"hydra.run.dir={tmp_path / ('bad_' + key)}")
        assert proc.returncode != 0 and "different splits" in proc.stderr and "000000000000" in proc.stderr, \
            proc.stderr[-2000:]


def test_explain_classifier_gradcam_scorecam_stability_vs_uncertainty(cls_run):
    run_script("explain.py", f"run_dir={cls_run}", "n_images=6", "split=val", "xai.stability.mc_dropout=3", "xai.stability.n_noise=1",
               "xai.methods.integrated_gradients.n_steps=4", "xai.methods.gradient_shap.n_samples=2",
               "xai.faithfulness.n_steps=4", "xai.methods.gradcam.layers=[net.backbone.layer2]",
               "xai.methods.scorecam.layer=net.backbone.layer2",  # layer4 is 1x1 at 32 px
               "xai.sanity.threshold=0.9")
    out = sorted((cls_run / "explanations").iterdir())[-1]
    res = json.loads((out / "metrics" / "explanations.json").read_text())
    assert res["target"]["kind"] == "class_logit"  # xai=classification chosen from the run's task
    assert {"gradcam", "scorecam", "saliency_logit", "ig_black", "gradient_shap", "occlusion"} <= set(res["maps"])
    # phantom opacities have masks: localisation is defined on positive images, counted as undefined on the rest
    pg = res["localisation"]["gradcam"]["pointing_game"]
    assert pg["n"] == res["n_images"] >= 3 and pg["n_undefined"] < res["n_images"]
    assert set(res["stability"]["gradcam"]) == {"mc_dropout", "noise"}  # no flip TTA for chest X-rays by default
    sv = res["stability_vs_uncertainty"]["gradcam/mc_dropout_spearman"]
    assert {"spearman_rho", "n_correct", "n_incorrect", "mannwhitney_p"} <= set(sv)
    assert sv["n_correct"] + sv["n_incorrect"] + sv["n_dropped"] == res["n_images"] and sv["n_dropped"] < res["n_images"]
    # production sanity path = xai.sanity.compare_to_randomised (the core of randomisation_check): a
    # trained model's saliency is far from a randomised model's (rank correlation < 0.9), so it passes
    # the check at threshold 0.9; every flag follows its own similarity and the threshold
    sal = res["sanity"]["saliency_logit"]
    assert sal["threshold"] == 0.9 and sal["spearman_abs"] < 0.9 and sal["passes"] is True
    assert all(v["passes"] == (v["spearman_abs"] is not None and v["spearman_abs"] < 0.9) for v in res["sanity"].values())
    assert (out / "figures" / "explanations" / "grid.png").is_file()
    proc = refused("explain.py", f"run_dir={cls_run}", "xai=segmentation")
    assert proc.returncode != 0 and "does not apply to a classification task" in proc.stderr


def test_compare_classifier_runs(cls_run, tmp_path):
    out = tmp_path / "cmp"
    run_script("evaluate.py", f"run_dirs=[{cls_run},{cls_run}]", "report=compare", "split=val", f"hydra.run.dir={out}")
    df = pd.read_csv(out / "comparison.csv")
    assert len(df) == 2 and {"auroc", "ece_top_label", "ece_top_label_adaptive", "brier", "aurc", "method",
                             "temperature", "temperature_fitted_on"} <= set(df)
    assert df["auroc"].iloc[0] == pytest.approx(df["auroc"].iloc[1])  # same run twice: same numbers
    val = json.loads((cls_run / "metrics" / "val.json").read_text())
    assert df["auroc"].iloc[0] == pytest.approx(val["cls"]["auroc"], abs=1e-6)
    assert (out / "figures" / "comparison" / "risk_coverage.png").is_file()
    assert "Comparison" in (out / "report" / "index.html").read_text()


def test_three_class_classifier_end_to_end(tmp_path):
    """C > 2: top-label calibration in the callback and the files, class-index explanation targets,
    subgroups without the binary metrics (phantom: none / pneumonia-like / COVID-like)."""
    run = tmp_path / "three"
    run_script("train.py", *TINY_CLS, "data.source.target=finding", "data.num_classes=3", f"hydra.run.dir={run}")
    logged = pd.read_csv(run / "csv" / "metrics.csv")
    assert "val/cal/ece_top_label" in logged and "val/cal/ece_positive" not in logged
    m = json.loads((run / "metrics" / "test.json").read_text())
    assert m["n_classes"] == 3 and "ece_positive" not in m["cls"] and 0 <= m["cls"]["ece_top_label"] <= 1
    assert m["cls"]["auroc"] > 0.5  # macro one-vs-rest AUROC of a trained model beats chance
    preds = pd.read_csv(run / "test_predictions.csv")
    assert {"prob_0", "prob_1", "prob_2"} <= set(preds) and set(preds["label"]) <= {0, 1, 2}
    assert "tpr" not in m["subgroups"]["attributes"]["sex"]["groups"]["F"]  # binary-only metrics left out
    run_script("explain.py", f"run_dir={run}", "n_images=4", "xai.target.class=2", "~xai.methods.scorecam",
               "~xai.methods.occlusion", "~xai.methods.integrated_gradients", "~xai.methods.gradient_shap",
               "xai.methods.gradcam.layers=[net.backbone.layer2]", "xai.stability_methods=[]", "xai.faithfulness=null")
    ex = sorted((run / "explanations").iterdir())[-1]
    assert json.loads((ex / "metrics" / "explanations.json").read_text())["target"]["class"] == 2
    proc = refused("explain.py", f"run_dir={run}", "xai.target.class=3")
    assert proc.returncode != 0 and "class index in [0, 3)" in proc.stderr


def test_one_class_test_split_and_skipped_files_are_stated(cls_run, tmp_path):
    """evaluate.py on labelled images of one class: AUROC is undefined and the result says so (not a silent
    NaN); under data.on_bad=skip the unreadable file is listed in the evaluation's splits/skipped.csv."""
    rng = np.random.default_rng(1)
    for i in range(6):
        write_png(tmp_path / "one" / "images" / "normal" / f"x{i}.png", rng.integers(0, 255, (40, 40), dtype=np.uint8))
    (tmp_path / "one" / "images" / "normal" / "broken.png").write_bytes(b"")
    out = tmp_path / "eval"
    run_script("evaluate.py", f"run_dir={cls_run}", "data=folder", f"data.root={tmp_path / 'one'}", "split=all",
               "data.source.classes_from_subfolders=true", "data.source.mask_dir=null", "data.on_bad=skip",
               f"hydra.run.dir={out}")
    res = json.loads((out / "metrics" / "test.json").read_text())
    assert res["n_images"] == 6 and res["cls"]["auroc"] is None
    assert "every image is class 0" in res["undefined"][0]
    preds = pd.read_csv(out / "test_predictions.csv")  # accuracy is still reported: the share predicted class 0
    assert res["cls"]["accuracy"] == pytest.approx(float((preds["pred"] == 0).mean()))
    skipped = pd.read_csv(out / "splits" / "skipped.csv")
    assert list(skipped["id"]) == ["images/normal/broken.png"] and "broken.png" in skipped["reason"][0]
    assert res["data"]["skipped"] == 1
