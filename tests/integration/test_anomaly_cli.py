"""SAFEGEN's anomaly task through train.py and evaluate.py on a tiny phantom (real subprocesses): the run
folder holds anomaly_stats.pt fitted on the calibration split, metrics/<split>.json the benchmark figures
per cohort, evaluate.py reproduces them, and bad input stops with a message."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from tests.conftest import run_script

TINY = ["experiment=safegen", "threads=1", "data.source.n_images=120", "data.source.size=32", "data.image_size=[32,32]",
        "trainer.max_epochs=2", "model.net.block_out_channels=[16,32]", "model.net.attention_levels=[false,true]",
        "model.net.norm_num_groups=8", "model.reconstruction.k=3", "model.scoring.min_clean_images=5",
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
    assert set(m["detectors"]) == {"residual", "contrastive", "fused"}
    assert m["detectors"]["residual"]["overall"]["auroc"] == pytest.approx(m["overall"]["auroc"])
    assert set(m["detectors"]["fused"]["cohorts"]) == set(m["cohorts"])
    assert m["reconstruction"]["timesteps"][0] <= 250 and m["reconstruction"]["evaluations_per_image"] == 3
    per = pd.read_csv(anomaly_run / "metrics" / "test_benchmark.csv")
    assert len(per) == m["n_images"] == m["benchmark"]["n_clean"] + 4 * 5 * 2
    assert (per[per.label == 0].cohort == "clean").all() and set(per[per.label == 1].severity) == {1, 2, 3, 4, 5}
    html = (anomaly_run / "report" / "index.html").read_text()
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
    proc = run_script("train.py", *TINY, "model.scoring.min_clean_images=500", f"hydra.run.dir={tmp_path / 'r'}",
                      check=False, timeout=900)
    out = proc.stderr + proc.stdout
    assert proc.returncode != 0 and "from 20 clean real images: at least 500 are needed" in out


def test_a_bad_model_key_names_it(tmp_path):
    proc = run_script("train.py", *TINY, "+model.reconstruction.steps=3", "train=false",
                      f"hydra.run.dir={tmp_path / 'r'}", check=False)
    assert proc.returncode != 0 and "model.reconstruction: unknown key(s) ['steps']" in proc.stderr + proc.stdout
