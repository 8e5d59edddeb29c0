"""Binary segmentation task (GlassBox-XAI): Attention U-Net + Dice/Tversky/hybrid losses."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from medtrust.metrics.segmentation import SegmentationMetric
from medtrust.tasks.base import TaskBase, load_init_weights


class SegmentationTask(TaskBase):
    """LightningModule for binary segmentation.

    Logs ``train/loss``, ``val/loss``, ``{val,test}/seg/{dice,iou,precision,recall,accuracy,f1,
    fp_rate,fn_rate}``. ``validation_step``/``test_step`` return ``{"prob", "target"}`` so
    callbacks (calibration, explanations) reuse the forward pass.

    Args:
        net: network mapping B×C×H×W images to B×1×H×W logits.
        loss: loss on (logits, mask).
        optimizer: partial optimizer (``params`` filled in here).
        scheduler: optional partial LR scheduler (its horizon is filled from the trainer).
        scheduler_interval: ``step`` or ``epoch``.
        threshold: probability threshold for the predicted mask.
        monitor: metric used for checkpointing/early stopping (read by the callback configs).
        monitor_mode: ``max`` or ``min``.
        init_from: optional checkpoint whose matching weights initialise the model (fine-tuning).
        channels_last: use the channels-last memory format (faster convolutions on some CPUs).
        tta: test-time flips averaged in ``predict_step`` (evaluation, explanations):
            any of ``hflip``, ``vflip``; with both, the combined flip is added too. Training and
            validation-time checkpoint selection use the plain forward pass.
    """

    task_name = "segmentation"

    def __init__(
        self,
        net: nn.Module,
        loss: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "step",
        threshold: float = 0.5,
        monitor: str = "val/seg/dice",
        monitor_mode: str = "max",
        init_from: str | None = None,
        channels_last: bool = False,
        tta: list[str] | None = None,
    ) -> None:
        super().__init__()
        if not 0 < threshold < 1:
            raise ValueError(f"model.threshold must be in (0, 1), got {threshold}")
        if scheduler_interval not in ("step", "epoch"):
            raise ValueError(f"model.scheduler_interval must be 'step' or 'epoch', got {scheduler_interval!r}")
        tta = list(tta or [])
        if not set(tta) <= {"hflip", "vflip"}:
            raise ValueError(f"model.tta entries must be hflip/vflip, got {tta}")
        if monitor_mode not in ("max", "min"):
            raise ValueError(f"model.monitor_mode must be 'max' or 'min', got {monitor_mode!r}")
        self.save_hyperparameters(ignore=["net", "loss", "optimizer", "scheduler"])
        self.net, self.loss = net, loss
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.scheduler_interval, self.threshold, self.monitor = scheduler_interval, threshold, monitor
        self.channels_last = channels_last
        # flip dims of each test-time view (identity first); both flips add the combined flip
        dims = [[-1]] * ("hflip" in tta) + [[-2]] * ("vflip" in tta)
        self.tta_views: list[list[int]] = [[], *dims] + ([[-2, -1]] if len(dims) == 2 else [])
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.train_metric = SegmentationMetric(threshold)
        self.val_metric = SegmentationMetric(threshold)
        self.test_metric = SegmentationMetric(threshold)
        self.init_report = load_init_weights(self, init_from) if init_from else None

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Logits B×1×H×W for images B×C×H×W."""
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        return self.net(image)

    def _shared_step(self, batch: dict[str, Any], stage: str) -> dict[str, torch.Tensor]:
        if "mask" not in batch:
            raise KeyError(f"{stage} batch has no 'mask'; the segmentation task needs data with masks (data.require_mask=true)")
        logits = self(batch["image"])
        loss = self.loss(logits, batch["mask"])
        prob = torch.sigmoid(logits)
        bs = batch["image"].shape[0]
        self.log(f"{stage}/loss", loss, on_step=stage == "train", on_epoch=True, prog_bar=stage != "test",
                 batch_size=bs)
        metric = getattr(self, f"{stage}_metric")
        metric.update(prob.detach(), batch["mask"])
        return {"loss": loss, "prob": prob.detach(), "target": batch["mask"]}

    def _log_epoch(self, stage: str) -> None:
        metric = getattr(self, f"{stage}_metric")
        values = metric.compute()
        self.log_dict({f"{stage}/seg/{k}": v.float() for k, v in values.items() if k != "dice"})
        self.log(f"{stage}/seg/dice", values["dice"].float(), prog_bar=True)
        metric.reset()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")["loss"]

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._shared_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._shared_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int = 0) -> dict[str, torch.Tensor]:
        """Returns ``{"logits", "prob", "mask_pred"}`` (B×1×H×W each); with ``tta`` the
        probabilities are the mean over the flipped views (flipped back) and ``logits`` their logit."""
        x = batch["image"]
        if len(self.tta_views) == 1:
            logits = self(x)
            prob = torch.sigmoid(logits)
        else:
            prob = torch.stack([torch.sigmoid(self(x.flip(d) if d else x)).flip(d) if d else torch.sigmoid(self(x))
                                for d in self.tta_views]).mean(0)
            logits = torch.logit(prob, eps=1e-6)
        return {"logits": logits, "prob": prob, "mask_pred": (prob >= self.threshold).float()}

    def explain_target(self, logits: torch.Tensor, region: torch.Tensor | None = None, use_sigmoid: bool = True) -> torch.Tensor:
        """Scalar per image for attribution: sum of sigmoid (or logits) over ``region``, by default
        the predicted mask. Args: logits B×1×H×W; region B×1×H×W or None. Returns: B."""
        out = torch.sigmoid(logits) if use_sigmoid else logits
        if region is None:
            region = (torch.sigmoid(logits) >= self.threshold).float().detach()
        return (out * region).flatten(1).sum(1)

    def evaluate_split(self, datamodule: Any, split: str, out_dir: Any, cfg: Any = None,
                       extra: dict[str, Any] | None = None, calibration: dict[str, Any] | None = None) -> dict[str, Any]:
        """Full evaluation of one split into ``out_dir`` (metrics JSON/CSV and figures)."""
        from medtrust.evaluation.segmentation import evaluate_segmentation

        return evaluate_segmentation(self, datamodule, split, out_dir, cfg, extra)
