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
    assert float(trainer.logged_metrics["val/cal/ece_positive"]) == pytest.approx(compute_binary_ece(probs, y, 10), abs=1e-5)
    assert "val/cal/brier" in trainer.logged_metrics and "val/cal/ece_top_label" not in trainer.logged_metrics


def test_three_class_classifier_logs_top_label_calibration(tmp_path):
    """C > 2 crashed the default calibration callback; it now logs top-label calibration only."""
    from medtrust.metrics.calibration import calibration_bins, ece_from_bins
    from medtrust.nets.classifier import TimmClassifier
    from medtrust.tasks.classification import ClassificationTask

    torch.manual_seed(0)
    task = ClassificationTask(TimmClassifier("resnet18", num_classes=3, in_chans=1), torch.nn.CrossEntropyLoss(),
                              partial(torch.optim.SGD, lr=0.0), mc_samples=0)
    x, y = torch.rand(9, 1, 32, 32), torch.tensor([0, 1, 2] * 3)
    data = DataLoader([{"image": x[i], "label": y[i]} for i in range(9)], batch_size=3)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[CalibrationCallback(n_bins=10)], default_root_dir=tmp_path)
    trainer.validate(task, data)
    with torch.no_grad():
        conf, pred = torch.softmax(task.eval()(x), -1).max(-1)
    want = ece_from_bins(calibration_bins(conf, (pred == y).float(), 10))["ece"]
    assert float(trainer.logged_metrics["val/cal/ece_top_label"]) == pytest.approx(want, abs=1e-5)
    assert "val/cal/ece_positive" not in trainer.logged_metrics and "val/cls/ece_top_label" in trainer.logged_metrics


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
