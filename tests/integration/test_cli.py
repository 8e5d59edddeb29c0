"""train.py / evaluate.py end to end on tiny configs (real subprocesses, as a user runs them)."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.conftest import SHARED_DATA, TINY, TINY_MODEL, refused, run_script, run_script_capped

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
    assert {"ece_positive", "mce_positive", "brier", "reliability"} <= set(m["cal"])
    assert len(m["cal"]["reliability"]["count"]) == m["cal"]["n_bins"] == 15  # n bins, as documented
    assert m["ci95"]["dice"][0] <= m["seg"]["dice"] <= m["ci95"]["dice"][1]
    assert m["metric_groups"] == ["seg", "cal"] and m["task"] == "segmentation"
    # the best-Dice threshold of the sweep is in-sample; the post-fit one was chosen on val
    ta = m["threshold_analysis"]
    assert ta["best_dice_in_sample"] is True and ta["fitted_on"] == "val" and ta["fitted_in_sample"] is False
    assert json.loads((tiny_run / "threshold.json").read_text())["fitted_on"] == "val"
    val = json.loads((tiny_run / "metrics" / "val.json").read_text())
    assert val["threshold_analysis"]["fitted_in_sample"] is True
    per = pd.read_csv(tiny_run / "metrics" / "test_per_image.csv")
    assert len(per) == m["n_images"] and per["dice"].mean() == pytest.approx(m["seg"]["dice"])
    ckpt = torch.load(tiny_run / "checkpoints" / "best.ckpt", weights_only=True)
    assert any(k.startswith("net.") for k in ckpt["state_dict"])
    splits = pd.read_csv(tiny_run / "splits" / "splits.csv")
    assert splits.groupby("patient_id")["split"].nunique().max() == 1
    logged = pd.read_csv(tiny_run / "csv" / "metrics.csv")
    assert {"val/seg/dice", "val/cal/ece_positive", "train/loss_step"} <= set(logged.columns)
    assert "not a medical device" in (tiny_run / "report" / "index.html").read_text()


def test_readme_smoke_run_stays_under_a_memory_cap(tmp_path):
    """``python train.py experiment=tiny`` (the README's smoke run: 400 phantom images, 32 px, the
    test split's ~47k pixels) once reached 24 GB and was killed: torchmetrics' deterministic PR
    curve allocated pixels x 101 x 404 x 8 bytes. The binned accumulator keeps it small."""
    proc, peak_mb = run_script_capped("train.py", "experiment=tiny", "threads=1", f"hydra.run.dir={tmp_path / 'tiny'}",
                                      max_rss_mb=2500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert peak_mb < 2500 and (tmp_path / "tiny" / "metrics" / "test_pr_curve.csv").is_file()


def test_evaluate_rebuilds_the_run_and_reproduces_its_test_metrics(tiny_run):
    before = sha(tiny_run / "metrics" / "test.json")
    run_script("evaluate.py", f"run_dir={tiny_run}")
    evals = sorted((tiny_run / "evaluations").iterdir())
    got = json.loads((evals[-1] / "metrics" / "test.json").read_text())
    want = json.loads((tiny_run / "metrics" / "test.json").read_text())
    assert got["seg"]["dice"] == pytest.approx(want["seg"]["dice"], abs=1e-9)
    assert got["cal"]["ece_positive"] == pytest.approx(want["cal"]["ece_positive"], abs=1e-6)  # thread count may differ
    assert got["threshold_analysis"]["fitted_threshold"] == want["threshold_analysis"]["fitted_threshold"]
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
    proc = refused("train.py", *TINY, f"hydra.run.dir={tiny_run}")
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
    (["trainer.max_epochs=abc"], "trainer.max_epochs=abc: expected a number (the config holds 2), got str 'abc'"),
    (["data.image_size=3"], "data.image_size=3: expected a list (the config holds [32, 32])"),
    (["data.augment.brightness.enabled=maybe"], "data.augment.brightness.enabled=maybe: expected a bool"),
])
def test_train_bad_input_gives_one_clear_message(args, msg, tmp_path):
    proc = refused("train.py", *TINY_MODEL, *args, f"hydra.run.dir={tmp_path / 'bad'}")
    assert proc.returncode != 0 and msg in proc.stderr


def test_a_data_error_prints_its_message_alone_and_verbose_the_traceback(tmp_path):
    args = [*TINY_MODEL, "data=csv", "data.manifest=/nonexistent/manifest.csv"]
    proc = refused("train.py", *args, f"hydra.run.dir={tmp_path / 'a'}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-2].startswith("train.py: DataError: ") and "manifest not found: /nonexistent/manifest.csv" in lines[-2]
    assert "--verbose" in lines[-1]
    assert "manifest not found" in (tmp_path / "a" / "train.log").read_text()      # the run's log keeps it
    proc = refused("train.py", *args, f"hydra.run.dir={tmp_path / 'b'}", "--verbose")
    assert "Traceback" in proc.stderr and "manifest not found" in proc.stderr


def test_evaluate_bad_run_dir(tmp_path):
    proc = refused("evaluate.py", f"run_dir={tmp_path / 'missing'}")
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
    # a floor a broken model misses: predicting "lesion everywhere" scores 2g/(1+g) per image (g = the
    # lesion's share of the image; about 0.42 here); 2 epochs of this tiny U-Net reach about 0.61
    g = pd.read_csv(run / "metrics" / "val_per_image.csv")["gt_fraction"]
    trivial = float((2 * g / (1 + g)).mean())
    assert val["n_images"] == 30 and val["seg"]["dice"] > trivial + 0.1, (val["seg"]["dice"], trivial)
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
    # the pointing game recomputed from the saved maps and masks: undefined exactly where the map is
    # all-zero (or the mask empty), and the mean over the rest
    import numpy as np
    from medtrust.utils.names import safe_filename

    pg = res["localisation"]["gradcam_output"]["pointing_game"]
    ids = pd.read_csv(tiny_run / "splits" / "splits.csv").query("split == 'test'")["id"].tolist()[:3]
    maps = [np.load(out / "explanations" / "gradcam_output" / f"{safe_filename(i)}.npz")["map"] for i in ids]
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    dm = instantiate(OmegaConf.load(tiny_run / ".hydra" / "config.yaml").data)
    masks = [dm.dataset("test")[i]["mask"][0].numpy() for i in range(3)]
    hits = [bool(mk.flat[int(np.argmax(mp))] > 0) for mp, mk in zip(maps, masks) if mp.any() and mk.any()]
    assert pg["n"] == 3 and pg["n_undefined"] == 3 - len(hits)
    assert pg["mean"] == (pytest.approx(np.mean(hits)) if hits else None)
    assert set(res["stability"]["saliency_logit"]) == {"mc_dropout", "tta", "noise"}
    assert {"deletion_auc", "insertion_auc"} <= set(res["faithfulness"]["gradcam_output"])
    assert "occlusion" not in res["sanity"] and "passes" in res["sanity"]["saliency_logit"]
    assert len(list((out / "explanations" / "ig_black").glob("*.npz"))) == 3
    assert len(list((out / "explanations" / "ig_black").glob("*.png"))) == 3 + 1  # per image + strip
    assert (out / "figures" / "explanations" / "grid.png").is_file()
    proc = refused("explain.py", f"run_dir={tiny_run}", "xai.methods.gradcam.layers=[net.nope]")
    assert proc.returncode != 0 and "available module paths" in proc.stderr
    proc = refused("explain.py", f"run_dir={tiny_run}", "xai=classification")
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


@pytest.mark.parametrize("target", ["pathlib.Path.touch", "builtins.exec", "torch.load"])
def test_a_hostile_run_folder_cannot_run_code(tiny_run, tmp_path, target):
    """A run folder received from someone else: its config names a callable that would run when
    evaluate.py / explain.py rebuild the model. It is refused before anything is instantiated."""
    from omegaconf import OmegaConf

    evil = tmp_path / "evil"
    shutil.copytree(tiny_run, evil, ignore=shutil.ignore_patterns("evaluations", "explanations"))
    marker = tmp_path / "PWNED"
    cfg = OmegaConf.load(evil / ".hydra" / "config.yaml")
    payload = {"pathlib.Path.touch": {"_target_": target, "self": str(marker)},
               "builtins.exec": {"_target_": target, "_args_": [f"open({str(marker)!r}, 'w')"]},
               "torch.load": {"_target_": target, "f": str(marker), "weights_only": False}}[target]
    cfg.model.net = payload
    (evil / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    for script in ("evaluate.py", "explain.py") if target == "torch.load" else ("evaluate.py",):
        proc = run_script(script, f"run_dir={evil}", check=False)
        assert proc.returncode != 0 and "model.net._target_" in proc.stderr and target in proc.stderr, proc.stderr[-1500:]
        assert not marker.exists()
