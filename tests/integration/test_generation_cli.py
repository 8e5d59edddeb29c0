"""The two-stage generator end to end on tiny configs (real subprocesses, as a user runs them):
train.py experiment=minim_vae, then experiment=minim on its run, then evaluate.py with refit=true."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import refused, run_script

DATA = ["threads=1", "data.source.n_images=60", "data.source.size=32", "data.image_size=[32,32]", "data.batch_size=8",
        "data.eval_batch_size=16", "trainer.max_epochs=1", "trainer.log_every_n_steps=1",
        "trainer.check_val_every_n_epoch=1"]
VAE = ["model.net.block_out_channels=[8,16]", "model.net.norm_num_groups=8"]
GEN = ["model.vae.block_out_channels=[8,16]", "model.vae.norm_num_groups=8", "model.unet.block_out_channels=[16,32]",
       "model.unet.cross_attention_levels=[false,true]", "model.unet.norm_num_groups=8", "model.sampling.steps=3",
       "evaluation.sampling.steps=2", "evaluation.prompts_per_modality=2", "evaluation.evaluator.epochs=1",
       "evaluation.alignment.epochs=1",
       "evaluation.memorisation.min_images=3", "evaluation.bootstrap=50", "evaluation.subgroups.bootstrap=20",
       "callbacks.samples.every_n_epochs=1", "callbacks.samples.steps=2", "callbacks.samples.per_modality=1"]
KEYS = ("fid", "kid", "ms_ssim", "alignment", "modality_accuracy", "finding_accuracy", "memorised_share")


@pytest.fixture(scope="module")
def generator_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("minim")
    vae = root / "vae"
    run_script("train.py", "experiment=minim_vae", *DATA, *VAE, f"hydra.run.dir={vae}")
    gen = root / "gen"
    run_script("train.py", "experiment=minim", f"model.vae_run={vae}", *DATA, *GEN, f"hydra.run.dir={gen}")
    return gen


def test_generator_run_writes_every_figure_per_modality_with_calibrated_copy_thresholds(generator_run):
    g = json.loads((generator_run / "metrics" / "generation.json").read_text())
    assert g["split"] == "test"
    assert set(g["modalities"]) == {"cxr", "ct", "mri", "fundus", "oct"}
    per = pd.read_csv(generator_run / "metrics" / "test_generated.csv")
    for name, block in [("overall", g["overall"]), *g["modalities"].items()]:
        assert set(KEYS) <= set(block), sorted(set(KEYS) - set(block))
        rows = per if name == "overall" else per[per["modality"] == name]
        # the JSON figures are the per-image table's means (nothing lost or recomputed differently)
        assert block["n_images"] == len(rows) > 0
        assert block["modality_accuracy"] == pytest.approx(rows["modality_correct"].mean())
        assert block["memorised_share"] == pytest.approx(rows["near_copy"].mean())
    mem = g["memorisation"]
    assert mem["fitted_on"].startswith("val (") and set(mem["groups"]) == set(g["modalities"])
    # 3 real images per modality at most on this tiny val split: below min_images, so pooled
    assert all(v["pooled"] == (v["n"] < 3) for v in mem["groups"].values())
    assert mem["real_flag_rate"]["split"] == "test" and mem["real_flag_rate"]["n"] > 0
    ev = json.loads((generator_run / "evaluator" / "evaluator.json").read_text())
    assert ev["head_grid"] == 2 and ev["fitted_on"].startswith("train")
    assert (generator_run / "report" / "index.html").read_text().count("near-copy thresholds") >= 1


def test_evaluate_refit_fits_again_into_its_own_folder_and_leaves_the_run_alone(generator_run, tmp_path):
    before = hashlib.sha256((generator_run / "evaluator" / "evaluator.pt").read_bytes()).hexdigest()
    out = tmp_path / "ev"
    run_script("evaluate.py", f"run_dir={generator_run}", "refit=true", "split=val", "threads=1",
               "evaluation.evaluator.head_grid=1", "evaluation.evaluator.epochs=1", "evaluation.alignment.epochs=1",
               "evaluation.prompts_per_modality=1", "evaluation.guidance_ablation=false", "evaluation.bootstrap=50",
               "evaluation.memorisation.min_images=3", f"hydra.run.dir={out}")
    assert json.loads((out / "evaluator" / "evaluator.json").read_text())["head_grid"] == 1
    assert hashlib.sha256((generator_run / "evaluator" / "evaluator.pt").read_bytes()).hexdigest() == before
    m = json.loads((out / "metrics" / "val.json").read_text())
    assert m["fitted_from"].startswith("refit=true") and m["n_images"] == 2 * m["n_prompts"] >= 2
    # the run's own evaluation settings (evaluation.sampling.steps=2 at training, model.sampling 3) are kept
    # although evaluate.py adds evaluation=<the run's choice> to the command line
    assert m["sampling"]["steps"] == 2
    # on val, the thresholds are fitted on the same real val images: no out-of-sample null rate is claimed
    mem = m["memorisation"]
    assert "real_flag_rate" not in mem and mem["quantile"] == 0.99
    assert sum(v["n"] for v in mem["groups"].values()) == mem["pooled"]["n"]  # every real val image in one group


def test_generate_command_writes_seeded_images_with_their_csv_and_never_overwrites(generator_run, tmp_path):
    """generate.py with the config's defaults (no sampling override): the same seed gives the same
    images; the CSV says how each was made; a second job into the same folder is refused."""
    args = [f"run_dir={generator_run}", "prompt=chest X-ray: large opacity in the right lower lung", "modality=cxr",
            "n=2", "seed=3", "threads=1"]
    run_script("generate.py", *args, f"out_dir={tmp_path / 'a'}")
    run_script("generate.py", *args, f"out_dir={tmp_path / 'b'}")
    rows = pd.read_csv(tmp_path / "a" / "generated.csv")
    assert len(rows) == 2 and rows["seed"].tolist() == [3, 4] and set(rows["modality"]) == {"cxr"}
    assert {"prompt", "modality", "seed", "sampler", "steps", "guidance"} <= set(rows.columns)
    assert rows["steps"].tolist() == [3, 3]  # the run's model.sampling (evaluation.sampling is evaluation's)
    for name in sorted((tmp_path / "a" / "images").iterdir()):
        assert name.read_bytes() == (tmp_path / "b" / "images" / name.name).read_bytes()
    again = refused("generate.py", *args, f"out_dir={tmp_path / 'a'}")
    assert again.returncode != 0 and "exists" in again.stderr + again.stdout


def test_stage_two_without_a_stage_one_run_names_the_key(tmp_path):
    proc = refused("train.py", "experiment=minim", *DATA, *GEN, f"hydra.run.dir={tmp_path / 'x'}")
    assert proc.returncode != 0 and "model.vae_run is not set" in (proc.stdout + proc.stderr)
    assert not list(Path(tmp_path / "x").rglob("*.ckpt"))  # stopped before any training


def test_train_false_evaluates_what_training_would_start_from_including_the_vae_run(generator_run, tmp_path):
    """train=false with init_from and another autoencoder (model.vae_run): the evaluated generator has that
    autoencoder, as trainer.fit would have loaded it (it used to keep the checkpoint's)."""
    vae2 = tmp_path / "vae2"
    run_script("train.py", "experiment=minim_vae", *DATA, *VAE, "seed=7", f"hydra.run.dir={vae2}")
    common = ["experiment=minim", f"model.init_from={generator_run / 'checkpoints' / 'best.ckpt'}", *DATA, *GEN,
              "train=false", "test=false", f"evaluation.evaluator.from_run={generator_run}"]
    run_script("train.py", *common, f"hydra.run.dir={tmp_path / 'own'}")
    run_script("train.py", *common, f"model.vae_run={vae2}", f"hydra.run.dir={tmp_path / 'other'}")
    assert f"VAE from {vae2}" in (tmp_path / "other" / "train.log").read_text()
    assert "VAE from" not in (tmp_path / "own" / "train.log").read_text()
    own, other = (json.loads((tmp_path / r / "metrics" / "val.json").read_text())["generation"]["overall"]
                  for r in ("own", "other"))
    assert own["fid"] != other["fid"]


def test_the_audit_samples_a_generator_run_and_its_pipeline_folder_alike(generator_run, tmp_path):
    """evaluate.py audit=phantom with audit.generator.kind=run (and =pipeline on its save_pretrained folder):
    counterfactual pairs share their initial noise, the training data's make-up is reported, and a run and
    its exported pipeline give the same figures. Tiny classifier runs; the generator's RGB 32 px images are
    brought to their 1 channel with audit.resize=true."""
    clf = ["data.source.n_images=60", "data.drop_last=true", "data.source.size=32", "data.image_size=[32,32]", "trainer.max_epochs=1",
           "model.net.backbone=resnet10t", "model.mc_samples=2", "logger=csv", "threads=1"]
    for name, exp in (("pn", "audit_pneumonia"), ("cv", "audit_covid")):
        run_script("train.py", f"experiment={exp}", *clf, f"hydra.run.dir={tmp_path / name}")
    run_script("generate.py", f"run_dir={generator_run}", f"save_pretrained={tmp_path / 'pipe'}", "threads=1")
    audit = ["audit=phantom", f"audit.classifiers.pneumonia=[{tmp_path / 'pn'}]", f"audit.classifiers.covid=[{tmp_path / 'cv'}]",
             "audit.prompts.per_cell=2", "~audit.prompts.attributes",
             "+audit.prompts.attributes={sex: {F: female, M: male}, age_group: {young: young, old: elderly}}",
             "audit.prompts.template='chest X-ray of a {age_group} {sex} patient. {finding}'",
             "audit.real.data.source.n_images=80", "audit.real.data.source.size=32", "audit.real.data.image_size=[32,32]",
             "audit.resize=true", "audit.min_cell=4", "audit.n_boot=100", "audit.n_perm=100", "threads=1"]
    run_script("evaluate.py", *audit, "audit.generator.kind=run", f"audit.generator.run={generator_run}",
               f"hydra.run.dir={tmp_path / 'a_run'}")
    run_script("evaluate.py", *audit, "audit.generator.kind=pipeline", f"audit.generator.folder={tmp_path / 'pipe'}",
               "audit.generator.sampling.steps=3", "audit.generator.sampling.guidance=5.0",  # the run's sampling
               f"hydra.run.dir={tmp_path / 'a_pipe'}")
    m = json.loads((tmp_path / "a_run" / "metrics" / "audit.json").read_text())
    assert m["generator"]["kind"] == "run" and m["n_generated"] == 2 * 2 * 2 * 2 and "truth" not in m
    t = m["training_data"]
    assert t["status"] == "ok" and set(t["attributes"]["sex"]["counts"]) == {"F", "M"}
    assert sum(t["attributes"]["sex"]["counts"].values()) == t["n_train"]
    gen = pd.read_csv(tmp_path / "a_run" / "tables" / "generated.csv")
    assert (gen.groupby("pair_id").seed.nunique() == 1).all()
    p = json.loads((tmp_path / "a_pipe" / "metrics" / "audit.json").read_text())
    assert p["generator"]["kind"] == "pipeline" and p["training_data"]["status"] == "unknown"
    assert p["hallucination"]["rate"] == m["hallucination"]["rate"]
