"""Checkpoint selection by explanation quality: the rule (within the margin of the run's best constraint,
not of the best so far) and the callback's candidates, selected checkpoint and report in a real fit."""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from monai.losses import DiceLoss

from medtrust.callbacks.explanations import ExplanationCallback, choose_candidate, selected_checkpoint
from medtrust.data.datamodule import ImageDataModule
from medtrust.data.phantoms.derm import PhantomDermSource
from medtrust.nets.unet import attention_unet
from medtrust.tasks.segmentation import SegmentationTask
from medtrust.xai.methods import GradCAM

METRIC = "val/xai/gradcam_decoder/tta_spearman"
SEG_SPEC = {"kind": "region_logit", "region": "pred"}


def table(constraints, metrics):
    return {e: (c, m) for e, (c, m) in enumerate(zip(constraints, metrics))}


@pytest.mark.parametrize("constraints, metrics, kw, want", [
    # the brief's table: the old rule ("within 0.01 of the best so far") picked epoch 0 (0.99)
    ([0.10, 0.90, 0.895, 0.60], [0.99, 0.50, 0.70, 0.95], {}, 2),
    # only the run's best qualifies with a zero margin
    ([0.10, 0.90, 0.895, 0.60], [0.99, 0.50, 0.70, 0.95], {"within": 0.0}, 1),
    # 0.90 - 0.89 is 0.010000000000000009 in floats: still within 0.01
    ([0.90, 0.89], [0.1, 0.2], {}, 1),
    # a wide margin lets every epoch compete; min_epoch keeps the warm-up out
    ([0.10, 0.90, 0.895, 0.60], [0.99, 0.50, 0.70, 0.95], {"within": 1.0}, 0),
    ([0.10, 0.90, 0.895, 0.60], [0.99, 0.50, 0.70, 0.95], {"within": 1.0, "min_epoch": 1}, 3),
    # undefined metrics never win; ties go to the better constraint, then the earlier epoch
    ([0.90, 0.895, 0.90], [None, 0.7, 0.7], {}, 2),
    ([0.90, 0.90], [0.7, 0.7], {}, 0),
    # a minimised constraint (e.g. a loss) and a minimised metric (centre-of-mass shift)
    ([0.50, 0.20, 0.205, 0.40], [1.0, 3.0, 2.0, 0.5], {"mode": "min", "metric_mode": "min"}, 2),
    # nothing within the margin has a metric
    ([0.10, 0.90], [0.99, None], {}, None),
])
def test_choose_candidate_is_relative_to_the_runs_best(constraints, metrics, kw, want):
    kw = {"within": 0.01, **kw}
    cands = table(constraints, metrics)
    sign = 1 if kw.get("mode", "max") == "max" else -1
    best = sign * max(sign * c for c in constraints)
    assert choose_candidate(cands, best, **kw) == want


def test_choose_candidate_and_select_config_reject_bad_values():
    with pytest.raises(ValueError, match="mode and metric_mode"):
        choose_candidate({0: (0.5, 0.5)}, 0.5, 0.01, mode="maximum")
    with pytest.raises(ValueError, match="within >= 0"):
        choose_candidate({0: (0.5, 0.5)}, 0.5, -0.1)
    ok = {"metric": METRIC, "constraint": "val/seg/dice", "within": 0.01}
    for bad, match in [({"metric": METRIC}, "select needs"), ({**ok, "patience": 2}, "select needs"),
                       ({**ok, "mode": "best"}, "mode and metric_mode"), ({**ok, "min_epoch": -1}, ">= 0"),
                       ({**ok, "metric": "val/seg/dice"}, "val/xai/"),
                       ({**ok, "metric": "val/xai/g/tta_com_shift_px"}, "metric_mode: min")]:
        with pytest.raises(ValueError, match=match):
            ExplanationCallback({"g": GradCAM()}, SEG_SPEC, select=bad)
    with pytest.raises(ValueError, match="every_n_epochs > 0"):
        ExplanationCallback({"g": GradCAM()}, SEG_SPEC, every_n_epochs=0, select=ok)


class ScriptedMetric(L.Callback):
    """Logs ``val/scripted`` = values[epoch] (a constraint whose course the test knows)."""

    def __init__(self, values):
        self.values = values

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            pl_module.log("val/scripted", self.values[trainer.current_epoch])


class ListCandidates(L.Callback):
    """After the explanation callback at each validation end: which candidate files exist."""

    def __init__(self, folder: Path):
        self.folder, self.seen = folder, []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.seen.append(sorted(p.name for p in self.folder.glob("*.ckpt")))


def fit(tmp_path, select, epochs, extra=(), dropout=0.2, stability=None):
    torch.manual_seed(0)
    net = attention_unet(3, 1, channels=[4, 8, 16], strides=[2, 2], input_size=[32, 32], dropout=dropout)
    task = SegmentationTask(net, DiceLoss(sigmoid=True), partial(torch.optim.AdamW, lr=1e-2))
    dm = ImageDataModule(source=PhantomDermSource(n_images=24, size=32), image_size=[32, 32], batch_size=8)
    cb = ExplanationCallback({"gradcam": GradCAM(groups=["decoder"])}, SEG_SPEC, every_n_epochs=1, n_images=3,
                             stability=stability or {"tta": ["hflip"]}, select=select)
    probe = ListCandidates(tmp_path / "checkpoints" / "xai_candidates")
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
                        callbacks=[*extra, cb, probe])
    trainer.fit(task, datamodule=dm)
    return trainer, probe, json.loads((tmp_path / "metrics" / "xai_selection.json").read_text())


def test_fit_selects_the_best_explanations_within_the_margin(tmp_path):
    trainer, probe, rep = fit(tmp_path, {"metric": METRIC, "constraint": "val/seg/dice", "within": 1.0}, 2)
    # within 1.0 Dice point every measured epoch qualifies: both kept, the better tta_spearman chosen
    assert probe.seen == [["epoch_000.ckpt"], ["epoch_000.ckpt", "epoch_001.ckpt"]]
    assert [c["epoch"] for c in rep["candidates"]] == [0, 1] and all(c["qualifies"] for c in rep["candidates"])
    metric = {c["epoch"]: c["metric"] for c in rep["candidates"]}
    want = max(metric, key=lambda e: (metric[e], -e))
    assert rep["chosen_epoch"] == want and rep["reason"].startswith(f"epoch {want}:")
    assert rep["within"] == 1.0 and set(rep["constraint_by_epoch"]) == {"0", "1"}
    assert rep["best_constraint"] == max(rep["constraint_by_epoch"].values())
    chosen = tmp_path / "checkpoints" / "xai_selected.ckpt"
    assert selected_checkpoint(trainer) == chosen and rep["checkpoint"] == str(chosen)
    ckpt = torch.load(chosen, weights_only=True)
    assert ckpt["epoch"] == want and "state_dict" in ckpt
    assert not (tmp_path / "checkpoints" / "xai_candidates").exists()  # the choice is copied, the rest deleted
    assert not list(chosen.parent.glob(".*.tmp"))


def test_fit_prunes_candidates_behind_the_runs_best_and_reports_none(tmp_path):
    sel = {"metric": METRIC, "constraint": "val/scripted", "within": 0.01}
    trainer, probe, rep = fit(tmp_path, sel, 3, [ScriptedMetric([0.10, 0.90, 0.895])])
    # epoch 0 (useless model, trivially "within 0.01 of the best so far") is deleted once epoch 1 is better
    assert probe.seen == [["epoch_000.ckpt"], ["epoch_001.ckpt"], ["epoch_001.ckpt", "epoch_002.ckpt"]]
    notes = {c["epoch"]: c for c in rep["candidates"]}
    assert notes[0]["note"].startswith("pruned at epoch 1") and not notes[0]["qualifies"]
    assert rep["chosen_epoch"] in (1, 2) and rep["best_constraint"] == pytest.approx(0.90)
    assert torch.load(selected_checkpoint(trainer), weights_only=True)["epoch"] == rep["chosen_epoch"]

    # warm-up past the last epoch: nothing qualifies, nothing is selected, the report says why
    trainer, probe, rep = fit(tmp_path / "none", {**sel, "min_epoch": 5}, 1, [ScriptedMetric([0.5])])
    assert selected_checkpoint(trainer) is None and rep["chosen_epoch"] is None and rep["checkpoint"] is None
    assert "min_epoch 5" in rep["reason"] and probe.seen == [[]]
    assert not (tmp_path / "none" / "checkpoints" / "xai_selected.ckpt").exists()


def test_mc_dropout_with_p_zero_is_not_logged_and_the_reason_is_kept(tmp_path, caplog):
    sel = {"metric": METRIC, "constraint": "val/seg/dice", "within": 1.0}
    with caplog.at_level("WARNING", logger="medtrust.callbacks.explanations"):
        trainer, _, rep = fit(tmp_path, sel, 2, dropout=0.0, stability={"mc_dropout": 2, "tta": ["hflip"]})
    assert not [k for k in trainer.callback_metrics if "mc_dropout" in k]
    assert METRIC in trainer.callback_metrics
    assert rep["undefined"]["mc_dropout"].startswith("undefined: no dropout module with p > 0 in SegmentationTask")
    assert sum("mc_dropout stability not logged" in r.getMessage() for r in caplog.records) == 1  # noted once
    with pytest.raises(ValueError, match="select.metric .*mc_dropout_spearman.*undefined: no dropout module"):
        fit(tmp_path / "mc", {**sel, "metric": "val/xai/gradcam_decoder/mc_dropout_spearman"}, 1, dropout=0.0,
            stability={"mc_dropout": 2})


def test_selected_checkpoint_without_selection_is_none(tmp_path):
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        callbacks=[ExplanationCallback({"g": GradCAM()}, SEG_SPEC)])
    assert selected_checkpoint(trainer) is None
