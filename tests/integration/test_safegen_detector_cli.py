"""SAFEGEN's real-vs-synthetic classifier (experiment=safegen_detector) through train.py and explain.py on a
tiny phantom: explain.py takes the run's own XAI suite, explains injected images only (every one has an
artifact mask, so localisation is defined for each) and draws SHAP's baselines from the real training images."""
from __future__ import annotations

import json

from tests.conftest import run_script

TINY = ["experiment=safegen_detector", "threads=1", "data.source.inner.n_images=120", "data.source.inner.size=32",
        "data.image_size=[32,32]", "trainer.max_epochs=1", "model.mc_samples=2"]


def test_the_detector_trains_and_its_maps_are_scored_against_the_artifact_masks(tmp_path):
    run = tmp_path / "run"
    run_script("train.py", *TINY, f"hydra.run.dir={run}", timeout=900)
    m = json.loads((run / "metrics" / "test.json").read_text())
    assert m["task"] == "classification" and "auroc" in json.dumps(m)
    ex = tmp_path / "ex"
    run_script("explain.py", f"run_dir={run}", "n_images=3", "threads=1", "~xai.methods.scorecam",
               "~xai.methods.integrated_gradients", "~xai.methods.occlusion", "xai.stability_methods=[gradcam]",
               "xai.methods.gradient_shap.n_samples=4",
               f"hydra.run.dir={ex}", timeout=900)
    e = json.loads((ex / "metrics" / "explanations.json").read_text())
    ref = e["reference"]
    assert ref["split"] == "train" and ref["label"] == 0 and 0 < ref["n"] == ref["n_available"] <= 1000
    assert {"gradcam", "gradient_shap", "saliency_logit"} <= set(e["localisation"])
    for name in ("gradient_shap", "saliency_logit"):
        pg = e["localisation"][name]["pointing_game"]
        assert pg["n"] == 3 and pg["n_undefined"] == 0       # injected images only: every one has a mask
