"""train.py / evaluate.py end to end on tiny configs (real subprocesses, as a user runs them)."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.conftest import SHARED_DATA, TINY, TINY_MODEL, run_script

pytestmark = pytest.mark.integration


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_train_writes_a_complete_run_folder(tiny_run):
    for rel in (".hydra/config.yaml", "config.yaml", "run.json", "checkpoints/best.ckpt", "checkpoints/last.ckpt",
                "metrics/val.json", "metrics/test.json", "metrics/test_per_image.csv",
                "metrics/test_threshold_sweep.csv", "metrics/test_pr_curve.csv", "splits/splits.csv",
                "splits/splits.json", "report/index.html", "figures/training/curves.png"):
        assert (tiny_run / rel).is_file(), rel
    figs = {p.name for p in (tiny_run / "figures" / "test").glob("*.png")}
    assert {"overlays.png", "batch_a_average.png", "batch_b_best.png", "batch_c_worst.png", "confusion_matrix.png",
            "threshold_sweep.png", "pr_curve.png", "reliability.png"} <= figs
    m = json.loads((tiny_run / "metrics" / "test.json").read_text())
    for k in ("dice", "iou", "precision", "recall", "accuracy", "f1", "fp_rate", "fn_rate"):
        assert 0.0 <= m["seg"][k] <= 1.0
    assert m["seg"]["tp"] + m["seg"]["fp"] + m["seg"]["tn"] + m["seg"]["fn"] == m["n_images"] * 32 * 32
    assert {"ece", "brier", "reliability"} <= set(m["cal"])
    per = pd.read_csv(tiny_run / "metrics" / "test_per_image.csv")
    assert len(per) == m["n_images"] and per["dice"].mean() == pytest.approx(m["seg"]["dice"])
    ckpt = torch.load(tiny_run / "checkpoints" / "best.ckpt", weights_only=True)
    assert any(k.startswith("net.") for k in ckpt["state_dict"])
    splits = pd.read_csv(tiny_run / "splits" / "splits.csv")
    assert splits.groupby("patient_id")["split"].nunique().max() == 1
    logged = pd.read_csv(tiny_run / "csv" / "metrics.csv")
    assert {"val/seg/dice", "val/cal/ece", "train/loss_step"} <= set(logged.columns)
    assert "not a medical device" in (tiny_run / "report" / "index.html").read_text()


def test_evaluate_rebuilds_the_run_and_reproduces_its_test_metrics(tiny_run):
    before = sha(tiny_run / "metrics" / "test.json")
    run_script("evaluate.py", f"run_dir={tiny_run}")
    evals = sorted((tiny_run / "evaluations").iterdir())
    got = json.loads((evals[-1] / "metrics" / "test.json").read_text())
    want = json.loads((tiny_run / "metrics" / "test.json").read_text())
    assert got["seg"]["dice"] == pytest.approx(want["seg"]["dice"], abs=1e-9)
    assert got["cal"]["ece"] == pytest.approx(want["cal"]["ece"], abs=1e-6)  # thread count may differ
    assert sha(tiny_run / "metrics" / "test.json") == before  # the run's own results are untouched
    assert (evals[-1] / "report" / "index.html").is_file()


def _metrics_files(run):
    """Every file in metrics/, with the run folder's path and wall-clock timings taken out."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if not k.endswith("seconds")}
        return [strip(v) for v in x] if isinstance(x, list) else x

    out = {}
    for p in sorted((run / "metrics").iterdir()):
        text = p.read_text().replace(str(run), "<run>")
        out[p.name] = strip(json.loads(text)) if p.suffix == ".json" else text
    return out


def test_same_config_and_seed_give_identical_metrics(tiny_run, tmp_path):
    """All of metrics/*.json and *.csv (per-image scores, sweeps, subgroups with their bootstrap and
    permutation tests) are identical, not just close."""
    run_script("train.py", *TINY, f"hydra.run.dir={tmp_path / 'again'}")
    a, b = _metrics_files(tiny_run), _metrics_files(tmp_path / "again")
    assert set(a) == set(b) and {"test.json", "val.json", "test_subgroups.csv", "test_per_image.csv"} <= set(a)
    for name in a:
        assert a[name] == b[name], name


def test_tensorboard_logger_writes_event_files(tmp_path):
    run_script("train.py", *TINY, "trainer.max_epochs=1", "logger=tensorboard", f"hydra.run.dir={tmp_path / 'tb'}")
    events = list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_a_new_run_never_writes_into_an_existing_run_folder(tiny_run):
    before = sha(tiny_run / "metrics" / "test.json")
    proc = run_script("train.py", *TINY, f"hydra.run.dir={tiny_run}", check=False)
    assert proc.returncode != 0 and "already holds a run" in proc.stderr
    assert sha(tiny_run / "metrics" / "test.json") == before


def test_init_from_fine_tunes_from_a_run_checkpoint(tiny_run, tmp_path):
    ckpt = tiny_run / "checkpoints" / "best.ckpt"
    run_script("train.py", *TINY, "loss=tversky", f"model.init_from={ckpt}", "trainer.max_epochs=1",
               f"hydra.run.dir={tmp_path / 'ft'}")
    rep = json.loads((tmp_path / "ft" / "init_from.json").read_text())
    assert rep["missing"] == [] and rep["unexpected"] == [] and len(rep["loaded"]) > 10


def test_multirun_runs_each_job_in_its_own_folder_and_writes_a_summary(tmp_path):
    sweep = tmp_path / "sweep"
    run_script("train.py", "-m", *TINY, "loss=dice,tversky", f"hydra.sweep.dir={sweep}")
    assert (sweep / "0" / "metrics" / "test.json").is_file() and (sweep / "1" / "metrics" / "test.json").is_file()
    summary = pd.read_csv(sweep / "summary.csv")
    assert len(summary) == 2 and summary["overrides"].str.contains("loss=tversky").any()
    assert (summary["status"] == "completed").all()
    assert "seg/dice" in summary.columns and (sweep / "summary.md").read_text().count("\n") >= 4


def test_compare_runs_side_by_side(tiny_run, tmp_path):
    other = tmp_path / "other"
    run_script("train.py", *TINY, "loss=hybrid", f"hydra.run.dir={other}")
    proc = run_script("evaluate.py", f"run_dirs=[{tiny_run},{other}]", f"hydra.run.dir={tmp_path / 'cmp'}")
    table = pd.read_csv(tmp_path / "cmp" / "comparison.csv")
    assert len(table) == 2 and set(table["run"]) == {"tiny/dice", "tiny/hybrid"}
    assert (tmp_path / "cmp" / "figures" / "comparison" / "comparison.png").is_file()
    assert "tiny/hybrid" in proc.stderr + proc.stdout


def test_csv_run_evaluated_on_the_test_rows_of_another_manifest(csv_dataset, tmp_path):
    run = tmp_path / "csvrun"
    run_script("train.py", *TINY_MODEL, "data=csv", f"data.manifest={csv_dataset}", "data.image_size=[32,32]",
               f"hydra.run.dir={run}")
    other = tmp_path / "other_data"
    shutil.copytree(csv_dataset.parent, other)
    df = pd.read_csv(other / "manifest.csv")
    df["split"] = ["test" if i % 2 else "train" for i in range(len(df))]
    df["patient_id"] = [f"q{i}" for i in range(len(df))]
    df.to_csv(other / "manifest.csv", index=False)
    run_script("evaluate.py", f"run_dir={run}", f"data.manifest={other / 'manifest.csv'}")
    res = json.loads((sorted((run / "evaluations").iterdir())[-1] / "metrics" / "test.json").read_text())
    assert res["n_images"] == int((df["split"] == "test").sum())
    assert str(other / "manifest.csv") in res["data"]["location"]
    assert res["data"]["image_size"] == [32, 32]


@pytest.mark.parametrize("args,msg", [
    (["data.fooo=1"], "fooo"),
    (["data=csv", "data.manifest=/nonexistent/manifest.csv"], "manifest not found: /nonexistent/manifest.csv"),
    (["loss=nope"], "nope"),
])
def test_train_bad_input_gives_one_clear_message(args, msg, tmp_path):
    proc = run_script("train.py", *TINY_MODEL, *args, f"hydra.run.dir={tmp_path / 'bad'}", check=False)
    assert proc.returncode != 0 and msg in proc.stderr


def test_evaluate_bad_run_dir(tmp_path):
    proc = run_script("evaluate.py", f"run_dir={tmp_path / 'missing'}", check=False)
    assert proc.returncode != 0 and "folder not found" in proc.stderr
    assert not (tmp_path / "missing").exists()  # nothing was created for a bad run_dir


@pytest.mark.shared_data
@pytest.mark.skipif(not (SHARED_DATA / "ph2_skin_lesion_seg" / "manifest.csv").exists(),
                    reason="../shared/data/ph2_skin_lesion_seg not present")
def test_ph2_trains_and_evaluates_from_its_manifest_as_it_is(tmp_path):
    run = tmp_path / "ph2"
    run_script("train.py", "experiment=glassbox_ph2", "data.image_size=[48,64]", "model.net.channels=[4,8,16]",
               "model.net.strides=[2,2]", "trainer.max_epochs=2", "threads=1", f"hydra.run.dir={run}")
    val = json.loads((run / "metrics" / "val.json").read_text())
    assert val["n_images"] == 30 and 0 <= val["seg"]["dice"] <= 1
    assert not (run / "metrics" / "test.json").exists()  # the shared PH2 copy has train/val rows only
    assert "research" in (run / "report" / "index.html").read_text()
    run_script("evaluate.py", f"run_dir={run}", "split=val")
    res = json.loads((sorted((run / "evaluations").iterdir())[-1] / "metrics" / "val.json").read_text())
    assert res["seg"]["dice"] == pytest.approx(val["seg"]["dice"], abs=1e-9)


FAST_XAI = ["xai.methods.integrated_gradients.n_steps=4", "xai.methods.gradient_shap.n_samples=2",
            "xai.stability.mc_dropout=2", "xai.stability.n_noise=1", "xai.faithfulness.n_steps=4"]


def test_explain_writes_maps_grid_and_every_explanation_metric(tiny_run):
    run_script("explain.py", f"run_dir={tiny_run}", "n_images=3", *FAST_XAI)
    out = sorted((tiny_run / "explanations").iterdir())[-1]
    res = json.loads((out / "metrics" / "explanations.json").read_text())
    assert {"saliency_logit", "saliency_prob", "ig_black", "ig_blur", "ig_mean", "ig_noise", "gradient_shap",
            "occlusion", "gradcam_encoder", "gradcam_attention", "gradcam_decoder", "gradcam_output", "scorecam",
            "slic_confidence"} <= set(res["localisation"])
    assert {"pointing_game", "relevance_mass", "topk_iou", "topk_dice", "heatmap_auroc"} <= set(res["localisation"]["ig_black"])
    pg = res["localisation"]["gradcam_output"]["pointing_game"]
    assert pg["n"] == 3 and pg["n_undefined"] + (pg["mean"] is not None) >= 1
    assert set(res["stability"]["saliency_logit"]) == {"mc_dropout", "tta", "noise"}
    assert {"deletion_auc", "insertion_auc"} <= set(res["faithfulness"]["gradcam_output"])
    assert "occlusion" not in res["sanity"] and "passes" in res["sanity"]["saliency_logit"]
    assert len(list((out / "explanations" / "ig_black").glob("*.npz"))) == 3
    assert len(list((out / "explanations" / "ig_black").glob("*.png"))) == 3 + 1  # per image + strip
    assert (out / "figures" / "explanations" / "grid.png").is_file()
    proc = run_script("explain.py", f"run_dir={tiny_run}", "xai.methods.gradcam.layers=[net.nope]", check=False)
    assert proc.returncode != 0 and "available module paths" in proc.stderr
    proc = run_script("explain.py", f"run_dir={tiny_run}", "xai=classification", check=False)
    assert proc.returncode != 0 and "does not apply to a segmentation task" in proc.stderr


def test_glassbox_variant_trains_on_the_isic_layout_with_official_splits(isic_root, tmp_path):
    run = tmp_path / "isic"
    run_script("train.py", "experiment=glassbox_recall", f"data.root={isic_root}", "data.image_size=[32,32]",
               "model.net.channels=[4,8,16]", "model.net.strides=[2,2]", "trainer.max_epochs=1", "threads=1",
               f"hydra.run.dir={run}")
    info = json.loads((run / "splits" / "splits.json").read_text())
    assert info["method"] == "source" and {s: c["images"] for s, c in info["counts"].items()} == \
        {"train": 6, "val": 3, "test": 3}
    assert json.loads((run / "metrics" / "test.json").read_text())["n_images"] == 3
    assert "TverskyLoss" in (run / "config.yaml").read_text()


def test_explanation_callback_logs_and_selects_the_checkpoint(tmp_path):
    run = tmp_path / "xai_cb"
    run_script("train.py", *TINY, "trainer.max_epochs=2", "xai=segmentation", "xai.callback.every_n_epochs=1",
               "xai.callback.n_images=3", "xai.callback.select={metric: val/xai/gradcam_decoder/tta_spearman,"
               " constraint: val/seg/dice, within: 1.0}", "callbacks.model_checkpoint.monitor=val/xai/select",
               "callbacks.model_checkpoint.mode=max", "callbacks.early_stopping=null", f"hydra.run.dir={run}")
    metrics = pd.read_csv(next((run / "csv").rglob("metrics.csv")))
    for key in ("val/xai/gradcam_decoder/pointing_game", "val/xai/gradcam_decoder/mc_dropout_spearman",
                "val/xai/gradcam_decoder/tta_topk_iou", "val/xai/seconds", "val/xai/select"):
        assert key in metrics.columns and metrics[key].notna().sum() == 2, key
    assert (run / "checkpoints" / "best.ckpt").is_file()
    # one explanation grid per measurement, 3 rows (n_images < figure_images), shown in the report
    grids = sorted((run / "figures" / "training").glob("xai_epoch_*.png"))
    assert [g.name for g in grids] == ["xai_epoch_000.png", "xai_epoch_001.png"]
    assert "xai epoch 001" in (run / "report" / "index.html").read_text()
