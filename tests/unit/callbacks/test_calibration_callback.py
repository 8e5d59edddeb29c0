"""The calibration callback logs val/cal/* from the task's validation outputs."""
from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
from monai.losses import DiceLoss
from torch.utils.data import DataLoader

from medtrust.callbacks.calibration import CalibrationCallback
from medtrust.metrics.calibration import compute_binary_ece
from medtrust.nets.unet import attention_unet
from medtrust.tasks.segmentation import SegmentationTask


def test_logs_pixel_ece_equal_to_the_pure_function(tmp_path):
    torch.manual_seed(0)
    net = attention_unet(3, 1, channels=[4, 8], strides=[2], input_size=[8, 8])
    task = SegmentationTask(net, DiceLoss(sigmoid=True), partial(torch.optim.SGD, lr=0.0))
    x = torch.rand(6, 3, 8, 8)
    y = (x[:, :1] > 0.5).float()
    data = DataLoader([{"image": x[i], "mask": y[i]} for i in range(6)], batch_size=3)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[CalibrationCallback(n_bins=10)], default_root_dir=tmp_path)
    trainer.validate(task, data)
    task.eval()
    with torch.no_grad():
        probs = torch.sigmoid(task(x))
    assert float(trainer.logged_metrics["val/cal/ece"]) == pytest.approx(compute_binary_ece(probs, y, 10), abs=1e-5)
    assert "val/cal/brier" in trainer.logged_metrics


def test_refuses_a_task_without_prob_outputs(tmp_path):
    class Bad(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 1)

        def validation_step(self, batch, idx):
            return self.lin(batch).sum()

    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[CalibrationCallback()], default_root_dir=tmp_path)
    with pytest.raises(RuntimeError, match="'prob' and 'target'"):
        trainer.validate(Bad(), DataLoader([torch.zeros(2)], batch_size=1))
