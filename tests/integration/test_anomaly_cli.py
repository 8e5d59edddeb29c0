"""SAFEGEN's anomaly task through train.py and evaluate.py on a tiny phantom (real subprocesses): the run
folder holds anomaly_stats.pt fitted on the calibration split, metrics/<split>.json the benchmark figures
per cohort, evaluate.py reproduces them, and bad input stops with a message."""
from __future__ import annotations

import json

import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from tests.conftest import refused, run_script

TINY = ["experiment=safegen", "threads=1", "data.source.n_images=120", "data.source.size=32", "data.image_size=[32,32]",
        "trainer.max_epochs=2", "model.net.block_out_channels=[16,32]", "model.net.attention_levels=[false,true]",
        "model.net.norm_num_groups=8", "model.reconstruction.k=3", "model.reconstruction.r=1", "model.scoring.min_clean_images=5",
        "evaluation.artifacts.per_severity=2", "evaluation.bootstrap=50"]


@pytest.fixture(scope="module")
def anomaly_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("anomaly") / "run"
    run_script("train.py", *TINY, f"hydra.run.dir={out}", timeout=900)
    return out


def test_the_run_writes_stats_and_the_benchmark_metrics_per_cohort(anomaly_run):
    assert (anomaly_run / "anomaly_stats.pt").is_file()
    m = json.loads((anomaly_run / "metrics" / "test.json").read_text())
    assert m["task"] == "anomaly" and set(m["cohorts"]) == {"displaced", "noise", "extreme", "subtle"}
    for block in (m["overall"], *m["cohorts"].values()):
        assert {"auroc", "auroc_ci", "pixel_auroc", "dice", "spearman_severity"} <= set(block)
        lo, hi = block["auroc_ci"]
        assert 0 <= lo <= block["auroc"] <= hi <= 1  # the CI is the bootstrap of this AUROC
    assert m["fitted"]["statistics_fitted_on"] == "cal" and not m["fitted"]["in_sample"]
    assert set(m["detectors"]) == {"residual", "raw_residual", "contrastive", "fused"}
    assert m["detectors"]["residual"]["overall"]["auroc"] == pytest.approx(m["overall"]["auroc"])
    assert set(m["detectors"]["fused"]["cohorts"]) == set(m["cohorts"])
    assert m["reconstruction"]["timesteps"][0] <= 250 and m["reconstruction"]["evaluations_per_image"] == 3
    per = pd.read_csv(anomaly_run / "metrics" / "test_benchmark.csv")
    assert len(per) == m["n_images"] == m["benchmark"]["n_clean"] + 4 * 5 * 2
    assert (per[per.label == 0].cohort == "clean").all() and set(per[per.label == 1].severity) == {1, 2, 3, 4, 5}
    injected = per[per.label == 1]
    assert set(m["kinds"]) == set(injected.kind)  # every kind drawn, with its own AUROC against all clean images
    clean = per[per.label == 0]
    for kind, v in m["kinds"].items():
        rows = pd.concat([clean, injected[injected.kind == kind]])
        assert v["n_injected"] == (injected.kind == kind).sum()
        assert v["auroc"] == pytest.approx(roc_auc_score(rows.label, rows.score), abs=1e-6)  # that kind vs all clean
    html = (anomaly_run / "report" / "index.html").read_text()
    assert "Image AUROC of each artifact kind" in html
    assert "Artifact detection (SAFEGEN)" in html and "image AUROC, injected vs clean" in html
    assert "Image AUROC of each score" in html


def test_evaluate_reproduces_the_run_metrics(anomaly_run, tmp_path):
    run_script("evaluate.py", f"run_dir={anomaly_run}", "split=test", "threads=1", f"hydra.run.dir={tmp_path / 'ev'}")
    a = json.loads((anomaly_run / "metrics" / "test.json").read_text())
    b = json.loads((tmp_path / "ev" / "metrics" / "test.json").read_text())
    assert a["overall"] == b["overall"] and a["cohorts"] == b["cohorts"]


def test_evaluate_builds_the_benchmark_from_the_test_rows_of_any_manifest(anomaly_run, csv_dataset, tmp_path):
    run_script("evaluate.py", f"run_dir={anomaly_run}", "data=csv", f"data.manifest={csv_dataset}", "threads=1",
               f"hydra.run.dir={tmp_path / 'ev'}")
    m = json.loads((tmp_path / "ev" / "metrics" / "test.json").read_text())
    n_test = int((pd.read_csv(csv_dataset)["split"] == "test").sum())
    assert m["benchmark"]["n_clean"] == n_test and str(csv_dataset) in m["benchmark"]["built_from"]
    assert m["n_images"] == n_test + 4 * 5 * 2 and set(m["cohorts"]) == {"displaced", "noise", "extreme", "subtle"}


def test_too_few_clean_images_for_the_statistics_are_refused(tmp_path):
    proc = refused("train.py", *TINY, "model.scoring.min_clean_images=500", f"hydra.run.dir={tmp_path / 'r'}")
    out = proc.stderr + proc.stdout
    assert proc.returncode != 0 and "clean real images: at least 500 are needed" in out


def test_a_bad_model_key_names_it(tmp_path):
    proc = refused("train.py", *TINY, "+model.reconstruction.steps=3", "train=false",
                   f"hydra.run.dir={tmp_path / 'r'}")
    assert proc.returncode != 0 and "model.reconstruction: unknown key(s) ['steps']" in proc.stderr + proc.stdout


TINY_AE = ["experiment=safegen_ae", "threads=1", "data.source.n_images=120", "data.source.size=32",
           "data.image_size=[32,32]", "trainer.max_epochs=2", "model.net.channels=[8,16]", "model.net.strides=[2,2]",
           "model.scoring.min_clean_images=5", "evaluation.artifacts.per_severity=2", "evaluation.bootstrap=50"]


def test_the_autoencoder_baseline_is_scored_on_the_same_benchmark_images(anomaly_run, tmp_path):
    """The baseline goes through the same contract: same splits, same benchmark rows (so the comparison
    pairs image by image), its own statistics, its own detector named in the metrics and the report."""
    ae = tmp_path / "ae"
    run_script("train.py", *TINY_AE, f"hydra.run.dir={ae}", timeout=900)
    m = json.loads((ae / "metrics" / "test.json").read_text())
    assert m["reconstruction"]["detector"] == "autoencoder" and m["reconstruction"]["evaluations_per_image"] == 1
    assert set(m["detectors"]) == {"residual", "raw_residual", "contrastive", "fused"}
    a = pd.read_csv(anomaly_run / "metrics" / "test_benchmark.csv")
    b = pd.read_csv(ae / "metrics" / "test_benchmark.csv")
    assert list(a.id) == list(b.id) and not a.score.equals(b.score)
    assert "convolutional autoencoder" in (ae / "report" / "index.html").read_text()


def test_another_reconstruction_at_evaluation_needs_the_statistics_fitted_again(anomaly_run, tmp_path):
    proc = refused("evaluate.py", f"run_dir={anomaly_run}", "threads=1", "evaluation.reconstruction.k=2",
                   f"hydra.run.dir={tmp_path / 'a'}")
    assert proc.returncode != 0 and "pass refit=true" in proc.stderr + proc.stdout
    proc = refused("evaluate.py", f"run_dir={anomaly_run}", "threads=1", "evaluation.scoring.image_score=top_k",
                   f"hydra.run.dir={tmp_path / 'c'}")
    assert proc.returncode != 0 and "fitted for scoring" in proc.stderr + proc.stdout
    run_script("evaluate.py", f"run_dir={anomaly_run}", "threads=1", "evaluation.reconstruction.k=2", "refit=true",
               "evaluation.reconstruction.t0=[20,50]", "evaluation.scoring.image_score=top_k",
               "evaluation.artifacts.n_clean=10", "evaluation.artifacts.cohorts=[extreme]",
               f"hydra.run.dir={tmp_path / 'b'}")
    m = json.loads((tmp_path / "b" / "metrics" / "test.json").read_text())
    assert m["reconstruction"]["k"] == 2 and m["reconstruction"]["t0"] == [20, 50]
    assert m["reconstruction"]["evaluations_per_image"] == 4  # two noise levels, K = 2, R = 1
    assert m["fitted"]["image_score"] == "top_k" and m["fitted"]["noise_levels"] == 2
    assert m["benchmark"]["n_clean"] == 10 and set(m["cohorts"]) == {"extreme"}
    assert (tmp_path / "b" / "anomaly_stats.pt").is_file()  # fitted again into the evaluation folder, the run untouched


def test_explain_attributes_the_anomaly_score_on_injected_artifacts_against_their_masks(anomaly_run, tmp_path):
    out = tmp_path / "ex"
    run_script("explain.py", f"run_dir={anomaly_run}", "n_images=4", "threads=1", "~xai.methods.occlusion",
               "~xai.methods.integrated_gradients", "xai.stability.n_noise=1", f"hydra.run.dir={out}", timeout=900)
    m = json.loads((out / "metrics" / "explanations.json").read_text())
    assert m["target"]["kind"] == "anomaly_score" and m["n_images"] == 4
    assert set(m["localisation"]) == {"saliency_logit", "gradient_shap"}
    for v in m["localisation"].values():  # against the artifact masks: defined for every image
        assert v["pointing_game"]["n"] == 4 and v["pointing_game"]["n_undefined"] == 0
    ids = sorted(p.stem for p in (out / "explanations" / "saliency_logit").glob("*.npz"))
    cohorts = {i.split("_s")[0] for i in ids}
    assert len(ids) == 4 and cohorts == {"displaced", "noise", "extreme", "subtle"}  # one of each cohort in turn


def test_the_benchmark_row_scores_every_number_of_steps_and_the_full_chain(anomaly_run, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(root / "experiments" / "benchmark.py"), "--rows", "anomaly_steps",
                           "--anomaly-run", str(anomaly_run), "--anomaly-per-severity", "1", "--anomaly-clean", "8",
                           "--anomaly-fit-images", "8", "--gen-boot", "20", "--out", str(tmp_path / "b")],
                          capture_output=True, text=True, timeout=900, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = pd.read_csv(tmp_path / "b" / "benchmark.csv").iloc[0]
    assert row["ddim2_evals"] == 2 and row["ddim50_evals"] == 50 and row["full_chain_evals"] == 51  # t0 = 50, r = 1
    assert 0 <= row["full_chain_auroc"] <= 1 and row["images"] == 8 + 4 * 5


def test_imported_ratings_are_scored_for_agreement_and_against_the_map(anomaly_run, tmp_path):
    """Simulated raters of known agreement rate the artifact and background of the benchmark's injected
    images (relevance: 5 on the artifact, 1 off it); evaluate.py reads them against the detector's maps."""
    from medtrust.anomaly.raters import simulate_region_raters

    per = pd.read_csv(anomaly_run / "metrics" / "test_benchmark.csv")
    ids = per[per.label == 1].id.tolist()[:12]
    truth = {**{(i, "artifact"): 5.0 for i in ids}, **{(i, "background"): 1.0 for i in ids}}
    sim = simulate_region_raters(truth, [{"sigma": 0.3}, {"sigma": 0.3}, {"sigma": 0.3, "bias": 0.4}], seed=1)
    sim.to_csv(tmp_path / "ratings.csv", index=False)
    run_script("evaluate.py", f"run_dir={anomaly_run}", "threads=1", f"evaluation.ratings={tmp_path / 'ratings.csv'}",
               f"hydra.run.dir={tmp_path / 'ev'}")
    r = json.loads((tmp_path / "ev" / "metrics" / "test.json").read_text())["raters"]
    assert r["n_raters"] == 3 and r["n_ratings"] == 72 and r["unknown_images"] == []
    assert r["krippendorff"]["alpha"] > 0.9  # raters who agree by construction
    assert set(r["wilcoxon_pairs"]) == {"r1 vs r2", "r1 vs r3", "r2 vs r3"}
    assert r["correlation_with_map"]["overall"]["n"] == 24
    bad = tmp_path / "bad.csv"
    sim.assign(region=sim.region.replace("background", "left lung")).to_csv(bad, index=False)
    proc = refused("evaluate.py", f"run_dir={anomaly_run}", "threads=1", f"evaluation.ratings={bad}",
                   f"hydra.run.dir={tmp_path / 'ev2'}")
    assert proc.returncode != 0 and "unknown region(s) ['left lung']" in proc.stderr + proc.stdout


@pytest.mark.parametrize("override,msg", [
    ("data.image_size=[16,16]", "images of 1 channel(s) at (16, 16), the detector was trained on 1 channel(s) at (32, 32)"),
    ("data.channels=3 data.normalize.mean=[0.5,0.5,0.5] data.normalize.std=[0.5,0.5,0.5]",
     "image has 1 channels, expected 3"),  # the data layer refuses first; the network stays the trained one
    ("data.channels=3", "data.normalize mean/std need 3 values"),
])
def test_images_of_another_size_or_channel_count_are_refused(anomaly_run, tmp_path, override, msg):
    proc = refused("evaluate.py", f"run_dir={anomaly_run}", "threads=1", *override.split(),
                   f"hydra.run.dir={tmp_path / 'ev'}")
    assert proc.returncode != 0 and msg in proc.stderr + proc.stdout


def test_the_real_cxr_manifest_keeps_patients_in_one_split_and_refuses_the_repository(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT, SHARED_DATA

    if not (SHARED_DATA / "pediatric_pneumonia_cxr_kermany").is_dir():
        pytest.skip("../shared/data is absent")
    script = [sys.executable, str(ROOT / "experiments" / "safegen_manifest.py")]
    subprocess.run([*script, "--out", str(tmp_path / "m")], check=True, capture_output=True, text=True)
    df = pd.read_csv(tmp_path / "m" / "manifest.csv")
    assert len(df) == 578 and set(df.split) == {"train", "val", "test"} and set(df.dataset) == {"kermany", "ieee8023"}
    assert df.groupby("patient_id").split.nunique().max() == 1  # no patient in two splits
    again = subprocess.run([*script, "--out", str(tmp_path / "m")], capture_output=True, text=True)
    assert again.returncode != 0 and "exists" in again.stderr  # never overwritten
    inside = subprocess.run([*script, "--out", str(ROOT / "medtrust" / "m")], capture_output=True, text=True)
    assert inside.returncode != 0 and "inside the repository" in inside.stderr


def _generated_folder(folder, size: int, n: int = 6):
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rows = []
    for i in range(n):
        arr = (np.random.default_rng(i).random((size, size, 3)) * 255).astype("uint8")  # RGB, read as grayscale
        Image.fromarray(arr).save(folder / f"img_{i}.png")
        rows.append({"file": f"img_{i}.png", "row": i, "sample": 0, "prompt": "chest X-ray", "modality": "cxr" if i < 4 else "mri"})
    pd.DataFrame(rows).to_csv(folder / "generated.csv", index=False)
    return folder


def test_generated_samples_are_a_fifth_cohort_flagged_against_clean_real_images(anomaly_run, tmp_path):
    gen = _generated_folder(tmp_path / "gen", 32)
    run_script("evaluate.py", f"run_dir={anomaly_run}", "threads=1", "evaluation.artifacts.n_clean=10",
               "evaluation.artifacts.cohorts=[extreme]", f"+evaluation.generated.folder={gen}",
               "+evaluation.generated.modality=cxr", f"hydra.run.dir={tmp_path / 'e'}")
    m = json.loads((tmp_path / "e" / "metrics" / "test.json").read_text())
    g = m["generated"]
    assert g["n"] == 4 and g["modality"] == "cxr" and 0 <= g["flagged"] <= 1 and g["n_clean"] == 10
    assert g["flagged_ci"][0] <= g["flagged"] <= g["flagged_ci"][1]
    assert g["excess"] == pytest.approx(g["flagged"] - g["clean_flagged"])
    assert set(m["cohorts"]) == {"extreme"}                                      # no AUROC cohort of its own
    rows = pd.read_csv(tmp_path / "e" / "metrics" / "test_generated.csv")
    assert len(rows) == 4 and set(rows.modality) == {"cxr"}
    big = _generated_folder(tmp_path / "big", 48, n=2)
    proc = refused("evaluate.py", f"run_dir={anomaly_run}", "threads=1", f"evaluation.generated={big}",
                   f"hydra.run.dir={tmp_path / 'f'}")
    assert proc.returncode != 0 and "img_0.png: a generated image of 48×48" in proc.stderr + proc.stdout
