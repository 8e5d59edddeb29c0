"""train.py with checkpoint selection by explanation stability: the selected checkpoint is the one evaluated."""
from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import TINY, run_script

pytestmark = pytest.mark.integration


def test_train_evaluates_the_xai_selected_checkpoint(tmp_path):
    run = tmp_path / "xai_select"
    run_script("train.py", *TINY, "trainer.max_epochs=2", "xai=segmentation", "xai.callback.every_n_epochs=1",
               "xai.callback.n_images=3", "xai.callback.select={metric: val/xai/gradcam_decoder/tta_spearman,"
               " constraint: val/seg/dice, within: 1.0}", "callbacks.early_stopping=null", f"hydra.run.dir={run}")
    selected = run / "checkpoints" / "xai_selected.ckpt"
    rep = json.loads((run / "metrics" / "xai_selection.json").read_text())
    # within 1.0 Dice point both measured epochs qualify: the better tta_spearman wins
    assert [c["epoch"] for c in rep["candidates"]] == [0, 1] and all(c["qualifies"] for c in rep["candidates"])
    metric = {c["epoch"]: c["metric"] for c in rep["candidates"]}
    assert rep["chosen_epoch"] == max(metric, key=lambda e: (metric[e], -e)) and rep["checkpoint"] == str(selected)
    assert torch.load(selected, weights_only=True)["epoch"] == rep["chosen_epoch"]
    assert not (run / "checkpoints" / "xai_candidates").exists()
    assert json.loads((run / "metrics" / "test.json").read_text())["checkpoint"].endswith("xai_selected.ckpt")
