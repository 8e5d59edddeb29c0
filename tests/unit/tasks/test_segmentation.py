"""Segmentation task: weights init from a checkpoint, explain target, steps and optimiser assembly."""
from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
from monai.losses import DiceLoss
from torch.utils.data import DataLoader

from medtrust.nets.unet import attention_unet
from medtrust.tasks.base import build_scheduler, load_init_weights
from medtrust.tasks.segmentation import SegmentationTask


def make_task(**kw):
    net = attention_unet(3, 1, channels=[4, 8, 16], strides=[2, 2], input_size=[16, 16])
    return SegmentationTask(net, DiceLoss(sigmoid=True), partial(torch.optim.AdamW, lr=1e-3), **kw)


def test_init_from_loads_matching_weights_and_reports_the_rest(tmp_path):
    torch.manual_seed(0)
    src = make_task()
    ckpt = tmp_path / "src.ckpt"
    sd = dict(src.state_dict())
    sd["extra.weight"] = torch.zeros(2)
    first = next(k for k in sd if k.endswith("conv.weight"))
    sd[first] = torch.zeros(1, 1, 1, 1)  # wrong shape: reported, not loaded
    torch.save({"state_dict": sd, "epoch": 3}, ckpt)
    torch.manual_seed(1)
    dst = make_task(init_from=str(ckpt))
    rep = dst.init_report
    assert rep["unexpected"] == ["extra.weight"] and rep["shape_mismatch"] == [first]
    assert first in rep["missing"]
    other = next(k for k in rep["loaded"] if k.endswith("conv.weight"))
    assert torch.equal(dst.state_dict()[other], src.state_dict()[other])
    assert not torch.equal(dst.state_dict()[first], src.state_dict()[first])


def test_init_from_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.init_from: checkpoint not found"):
        make_task(init_from=str(tmp_path / "missing.ckpt"))
    torch.save({"state_dict": {"foo": torch.zeros(1)}}, tmp_path / "x.ckpt")
    with pytest.raises(ValueError, match="no parameter"):
        load_init_weights(make_task(), tmp_path / "x.ckpt")


def test_explain_target_sums_sigmoid_over_predicted_mask():
    task = make_task()
    logits = torch.tensor([[[[4.0, -4.0], [0.0, 3.0]]]])
    got = task.explain_target(logits, None, "region_prob")
    want = torch.sigmoid(torch.tensor(4.0)) + torch.sigmoid(torch.tensor(0.0)) + torch.sigmoid(torch.tensor(3.0))
    assert got.item() == pytest.approx(want.item())
    region = torch.zeros_like(logits)
    region[..., 0, 1] = 1
    assert task.explain_target(logits, region, "region_logit").item() == pytest.approx(-4.0)


def test_segmenter_and_classifier_implement_the_task_contract():
    from medtrust.tasks.base import Task, check_task
    from medtrust.tasks.classification import ClassificationTask

    for cls in (SegmentationTask, ClassificationTask):
        check_task(cls)
        assert isinstance(make_task(), Task)
    with pytest.raises(TypeError, match="missing .*evaluate_split"):
        check_task(object())


def test_fit_a_few_steps_logs_metrics_and_predict_contract(tmp_path):
    torch.manual_seed(0)
    task = make_task()
    x = torch.rand(8, 3, 16, 16)
    y = (x[:, :1] > 0.5).float()
    data = DataLoader([{"image": x[i], "mask": y[i]} for i in range(8)], batch_size=4)
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(task, data, data)
    assert {"val/seg/dice", "val/seg/iou", "val/loss", "train/loss_epoch"} <= set(trainer.logged_metrics)
    out = task.predict_step({"image": x[:2]})
    assert set(out) == {"logits", "prob", "mask_pred"} and out["prob"].shape == (2, 1, 16, 16)


def test_scheduler_horizon_is_filled():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = build_scheduler(partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.1), opt, 40, 4, "step")
    assert sched.total_steps == 40
    sched = build_scheduler(partial(torch.optim.lr_scheduler.CosineAnnealingLR), opt, 40, 4, "epoch")
    assert sched.T_max == 4


@pytest.mark.parametrize("kw,msg", [({"threshold": 1.5}, "model.threshold"), ({"monitor_mode": "up"}, "monitor_mode"),
                                    ({"scheduler_interval": "batch"}, "scheduler_interval")])
def test_bad_arguments(kw, msg):
    with pytest.raises(ValueError, match=msg):
        make_task(**kw)


def test_tta_averages_flipped_views():
    torch.manual_seed(0)
    plain, tta = make_task(), make_task(tta=["hflip", "vflip"])
    tta.load_state_dict(plain.state_dict())
    plain.eval(), tta.eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        views = [torch.sigmoid(plain(x)), torch.sigmoid(plain(x.flip(-1))).flip(-1),
                 torch.sigmoid(plain(x.flip(-2))).flip(-2), torch.sigmoid(plain(x.flip(-2, -1))).flip(-2, -1)]
        got = tta.predict_step({"image": x})["prob"]
    assert torch.allclose(got, torch.stack(views).mean(0), atol=1e-6)
    assert len(tta.tta_views) == 4
    with pytest.raises(ValueError, match="model.tta"):
        make_task(tta=["rot90"])


@pytest.mark.parametrize("steps", [1, 2, 3, 20, 40])
@pytest.mark.parametrize("pct_start", [0.05, 0.1, 0.15])
def test_one_cycle_survives_runs_too_short_for_its_warm_up(steps, pct_start):
    """pct_start 0.05 of 20 steps (experiment=minim, trainer.limit_train_batches=20) divided by zero in OneCycleLR."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = build_scheduler(partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.1, pct_start=pct_start), opt,
                            steps, 1, "step")
    lrs = []
    for _ in range(steps):
        opt.step()
        sched.step() if len(lrs) < steps - 1 else None
        lrs.append(opt.param_groups[0]["lr"])
    assert all(0 < lr <= 0.1 + 1e-12 for lr in lrs)
    if pct_start * steps - 1 >= 0.5:
        assert sched.total_steps == steps and sched._schedule_phases[0]["end_step"] == pct_start * steps - 1
