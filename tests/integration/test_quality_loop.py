"""MINIM's quality loop end to end on tiny configs (real subprocesses): the loop trains a generator on
the phantom with known quality, rates its samples with simulated raters, trains the selector, scores
samples with it, fine-tunes LoRA with reward weights and measures before/after; then generate.py
applies the fine-tuned LoRA folder to the base run and filters with the selector."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from tests.conftest import refused, run_script
from tests.integration.test_generation_cli import DATA, GEN, VAE

EVAL = ["evaluation.sampling.steps=2", "evaluation.prompts_per_modality=1", "evaluation.evaluator.epochs=1",
        "evaluation.alignment.epochs=1", "evaluation.memorisation.min_images=3", "evaluation.bootstrap=20",
        "evaluation.subgroups.bootstrap=0", "evaluation.guidance_ablation=false"]
TINY_SAMPLES = ["callbacks.samples.every_n_epochs=1", "callbacks.samples.steps=2", "callbacks.samples.per_modality=1"]
SELECTOR = ["trainer.max_epochs=1", "model.mc_samples=2", "data.batch_size=8", "evaluation.bootstrap=20",
            "evaluation.subgroups.bootstrap=0", "evaluation.explanation_stability_samples=0", "evaluation.figures=false",
            "evaluation.n_failure_cases=0", "data.splits.calibration_fraction=0.5"]  # a cal split with two classes
FINETUNE = ["trainer.max_epochs=1", "trainer.check_val_every_n_epoch=1", "trainer.log_every_n_steps=1",
            "data.batch_size=8", *EVAL, *TINY_SAMPLES]


def _list(items):
    return "[" + ",".join(f"'{i}'" for i in items) + "]"


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    out = root / "loop"
    run_script("train.py", "experiment=minim_quality", "threads=1",
               f"pipeline.base_vae={_list(['experiment=minim_vae', 'data=phantom_multimodal_quality', *DATA, *VAE])}",
               f"pipeline.base={_list(['experiment=minim', 'data=phantom_multimodal_quality', *DATA, *GEN])}",
               f"pipeline.selector={_list(SELECTOR)}", f"pipeline.finetune={_list(FINETUNE)}",
               f"pipeline.common={_list(['threads=1'])}", "pipeline.prompts.rated=20", "pipeline.prompts.policy_per_prompt=1",
               "pipeline.sampling.steps=2", "pipeline.rater.n_reference=4", "pipeline.evaluation.bootstrap=50",
               "pipeline.evaluation.permutations=99", "pipeline.evaluation.n_show=2", "pipeline.batch_size=16",
               f"hydra.run.dir={out}", timeout=1500)
    return out


def test_loop_writes_every_stage_and_the_figures_the_issue_names(loop):
    q = json.loads((loop / "metrics" / "quality_loop.json").read_text())
    for stage in ("base_vae", "base", "pool_rated", "selector", "pool_policy", "finetune"):
        assert (loop / stage).is_dir(), stage
    assert [c["stage"] for c in q["commands"]] == ["base_vae", "base", "pool_rated", "selector", "pool_policy", "finetune"]
    assert (loop / "commands.txt").read_text().count("python ") == 6
    acc = q["selector_accuracy"]
    assert 0 <= acc["value"] <= 1 and acc["n"] >= 1 and "known quality" in acc["against"]
    top = q["top_rated_share"]
    assert {"before", "after", "diff", "diff_ci"} <= set(top) and top["rated_by"].startswith("known quality")
    per = pd.read_csv(loop / "metrics" / "quality_loop_images.csv")
    # the JSON's shares are the per-image table's: rating 3 by the known function before and after
    assert top["before"] == pytest.approx((per["rating_before"] == 3).mean())
    assert top["after"] == pytest.approx((per["rating_after"] == 3).mean())
    assert top["diff"] == pytest.approx(top["after"] - top["before"])
    assert top["n_images"] == len(per) == 2 * per["prompt_id"].nunique()
    # the same prompts and seeds before and after
    assert (per.groupby("prompt_id")["seed"].nunique() == 2).all()
    assert set(q["filtering"]["before"]["attributes"]) >= {"modality", "sex", "age_group"}
    for sex, g in q["filtering"]["after"]["attributes"]["sex"]["groups"].items():  # the images' part and the filter's
        rows = per[(per["sex"] == sex) & (per["rating_after"] == 3)]
        assert g["n_truth"] == len(rows) and g["recall"] == (pytest.approx(rows["kept_after"].mean()) if len(rows) else None)
    for m, d in q["per_modality"].items():  # per modality, from the same table
        rows = per[per["modality"] == m]
        assert d["n"] == len(rows) and d["after"]["top_rated_share"] == pytest.approx((rows["rating_after"] == 3).mean())
    assert q["selector"]["agreement"]["n_raters"] == 3
    assert 0 < q["fine_tuning"]["trainable_share_of_unet"] < 0.2 and q["fine_tuning"]["lora_bytes"] > 0  # tiny UNet
    sel = json.loads((loop / "selector" / "metrics" / "test.json").read_text())
    assert set(q["selector"]["subgroup_gaps"]) >= {"modality", "sex"}
    assert q["selector"]["ece_top_label"] == sel["cal"]["ece_top_label"] and q["selector"]["n_test"] == sel["n_images"]
    html = (loop / "report" / "index.html").read_text()
    assert "Quality loop" in html and "top-rated share" in html
    # the README's tables are printed from this JSON by a command
    table = run_script("experiments/quality_loop_table.py", str(loop)).stdout
    assert f"{top['before']:.3f} → {top['after']:.3f}, **{top['diff']:+.3f}**" in table
    assert f"{acc['value']:.3f}" in table and "| sex |" in table and all(f"| {m} |" in table for m in q["per_modality"])


def test_ratings_are_the_simulated_raters_of_the_rated_pool_and_the_selector_is_a_classifier_run(loop):
    ratings = pd.read_csv(loop / "ratings" / "ratings.csv")
    truth = pd.read_csv(loop / "ratings" / "truth.csv")
    assert set(ratings.columns) == {"path", "rating", "rater"} and ratings["rater"].nunique() == 3
    assert len(ratings) == 3 * len(truth) and ratings["rating"].between(1, 3).all()
    sel = json.loads((loop / "selector" / "metrics" / "test.json").read_text())
    assert sel["task"] == "classification" and sel["n_classes"] == 3
    assert "ece_top_label" in json.dumps(sel) and sel["data"]["ratings"]["n_raters"] == 3
    assert (loop / "selector" / "calibration.json").is_file()
    assert "Krippendorff" in (loop / "selector" / "report" / "index.html").read_text()  # the raters' agreement


def test_generate_applies_the_lora_folder_to_the_base_and_filters_with_the_selector(loop, tmp_path):
    base, tuned, selector = loop / "base", loop / "finetune", loop / "selector"
    args = ["prompt=chest X-ray: no opacity", "modality=cxr", "n=3", "seed=5", "threads=1", "sampling.steps=2"]  # as the README: no ++
    run_script("generate.py", f"run_dir={base}", f"lora={tuned / 'lora'}", *args, f"out_dir={tmp_path / 'lora'}")
    run_script("generate.py", f"run_dir={tuned}", *args, f"out_dir={tmp_path / 'run'}")
    # the base run + the LoRA folder makes the fine-tuned run's images
    for f in sorted((tmp_path / "run" / "images").iterdir()):
        assert f.read_bytes() == (tmp_path / "lora" / "images" / f.name).read_bytes()
    run_script("generate.py", f"run_dir={base}", *args, f"selector.run={selector}", "selector.min_score=0",
               f"out_dir={tmp_path / 'all'}")
    rows = pd.read_csv(tmp_path / "all" / "generated.csv")
    assert rows["kept"].tolist() == [1, 1, 1] and rows["selector_score"].between(1, 3).all()
    cut = float(rows["selector_score"].median())
    run_script("generate.py", f"run_dir={base}", *args, f"selector.run={selector}", f"selector.min_score={cut}",
               f"out_dir={tmp_path / 'kept'}")
    kept = pd.read_csv(tmp_path / "kept" / "generated.csv", keep_default_na=False)
    assert kept["selector_score"].tolist() == pytest.approx(rows["selector_score"].tolist())  # same images, same scores
    assert kept["kept"].tolist() == [int(s >= cut) for s in rows["selector_score"]]
    assert len(list((tmp_path / "kept" / "images").iterdir())) == sum(kept["kept"])
    assert all(f == "" for f, k in zip(kept["file"], kept["kept"]) if not k)


def test_lora_weights_refuse_another_base_and_min_score_needs_a_selector(loop, tmp_path):
    tuned = loop / "finetune"
    # another generator with other UNet shapes (trained one epoch: generate.py needs a checkpoint)
    other = tmp_path / "other"
    run_script("train.py", "experiment=minim", f"model.vae_run={loop / 'base_vae'}", *DATA, *GEN,
               "model.unet.block_out_channels=[16,16]", "test=false", *EVAL, "threads=1",
               f"hydra.run.dir={other}")
    proc = refused("generate.py", f"run_dir={other}", f"lora={tuned / 'lora'}", "prompt=x", "modality=cxr", "n=1",
                   f"out_dir={tmp_path / 'x'}")
    assert proc.returncode != 0 and "LoRA weights trained for a different base UNet" in proc.stderr + proc.stdout
    proc = refused("generate.py", f"run_dir={loop / 'base'}", "prompt=x", "modality=cxr", "n=1",
                   "selector.min_score=2", f"out_dir={tmp_path / 'y'}")
    assert proc.returncode != 0 and "selector.min_score needs selector.run" in proc.stderr + proc.stdout
