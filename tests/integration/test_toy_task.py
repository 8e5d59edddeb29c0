"""The task contract is enough: a toy third task that lives only in tests/toy (identity
reconstruction) trains, evaluates, compares, explains and reports through the generic paths of
train.py / evaluate.py / explain.py, with its configs from a Hydra search path and its report
section from its own template. Nothing in medtrust/ knows it."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from tests.conftest import ROOT, refused, run_script

pytestmark = pytest.mark.integration
SEARCH = f"hydra.searchpath=[file://{ROOT / 'tests' / 'toy' / 'conf'}]"
TOY = [SEARCH, "model=toy_reconstruction", "loss=mse", "data.source.n_images=40", "data.source.size=32",
       "data.image_size=[32,32]", "trainer.max_epochs=2", "threads=1"]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("toy") / "run"
    run_script("train.py", *TOY, "xai=reconstruction", f"hydra.run.dir={run}")
    return run


def test_medtrust_does_not_know_the_toy_task():
    for p in (ROOT / "medtrust").rglob("*"):
        if p.suffix in (".py", ".j2", ".yaml"):
            text = p.read_text()
            assert "tests.toy" not in text and "ReconstructionTask" not in text, p


def test_toy_task_trains_and_reports_through_the_generic_paths(toy_run):
    run = toy_run
    test = json.loads((run / "metrics" / "test.json").read_text())
    assert test["task"] == "reconstruction" and test["metric_groups"] == ["rec"] and test["rec"]["mse"] > 0
    assert (run / "recon_stats.json").is_file() and test["fitted"]["fitted_on"] == "val"  # its post-fit step ran
    assert (run / "metrics" / "test_reconstruction.csv").is_file()
    logged = pd.read_csv(run / "csv" / "metrics.csv")
    assert "val/rec/mse" in logged and "val/xai/saliency_logit/noise_spearman" in logged  # explanation callback
    assert "val/cal/ece_positive" not in logged  # its callbacks (default) have no calibration: none forced on it
    page = (run / "report" / "index.html").read_text()
    assert "Reconstruction (toy task section)" in page  # its own template
    trust = page.split("<h2>Trust summary</h2>")[1].split("<h2>")[0]
    assert "reconstruction MSE" in trust and "subgroups" in trust  # its own trust lines, first on the page
    assert page.index("Trust summary") < page.index("<h2>Metrics</h2>")
    from medtrust.report.summary import scalar_metrics

    assert set(scalar_metrics(test)) == {"rec/mse", "rec/psnr"}  # summary.csv / W&B columns


def test_toy_task_evaluates_compares_and_explains(toy_run, tmp_path):
    run_script("evaluate.py", f"run_dir={toy_run}", SEARCH)
    ev = sorted((toy_run / "evaluations").iterdir())[-1]
    got = json.loads((ev / "metrics" / "test.json").read_text())
    want = json.loads((toy_run / "metrics" / "test.json").read_text())
    assert got["rec"]["mse"] == pytest.approx(want["rec"]["mse"], rel=1e-6)
    assert "Reconstruction (toy task section)" in (ev / "report" / "index.html").read_text()

    out = tmp_path / "cmp"
    run_script("evaluate.py", f"run_dirs=[{toy_run},{toy_run}]", SEARCH, f"hydra.run.dir={out}")
    rows = pd.read_csv(out / "comparison.csv")
    assert len(rows) == 2 and rows["mse"].iloc[0] == pytest.approx(want["rec"]["mse"], rel=1e-6)

    run_script("explain.py", f"run_dir={toy_run}", SEARCH, "n_images=3")  # xai=reconstruction found on the search path
    ex = sorted((toy_run / "explanations").iterdir())[-1]
    res = json.loads((ex / "metrics" / "explanations.json").read_text())
    assert res["target"]["kind"] == "recon_error"
    assert {"saliency_logit", "gradcam", "occlusion"} <= set(res["maps"])
    assert "saliency_logit" in res["sanity"] and "mc_dropout" in res["stability"]["saliency_logit"]
    assert "stability_vs_uncertainty" in res  # its explain_outcome was used
    assert (ex / "figures" / "explanations" / "grid.png").is_file()


def test_a_run_folder_of_an_unknown_task_is_refused_without_its_config_tree(toy_run):
    """Without the search path that defines it, the toy task's _target_ is not on the allow-list:
    a run folder cannot make evaluate.py import and call code nobody vouched for."""
    proc = refused("evaluate.py", f"run_dir={toy_run}", "evaluation=segmentation")
    assert proc.returncode != 0 and "tests.toy.reconstruction.ReconstructionTask" in proc.stderr
