"""Calibration measured during validation/test from the task's own forward pass."""
from __future__ import annotations

from typing import Any

import lightning as L

from medtrust.metrics.calibration import BinaryCalibrationMetric


class CalibrationCallback(L.Callback):
    """Logs ``<stage>/cal/{ece,mce,brier}`` each validation (and test) epoch.

    For segmentation the measure is pixel-level (every pixel's probability against its label);
    for binary classification it is per image. The task's ``validation_step``/``test_step`` must
    return ``{"prob": ..., "target": ...}`` of equal shape.

    Args:
        n_bins: equal-width confidence bins.
        stages: stages to measure (``val``, ``test``).
    """

    def __init__(self, n_bins: int = 15, stages: tuple[str, ...] = ("val", "test")) -> None:
        super().__init__()
        self.n_bins, self.stages = int(n_bins), tuple(stages)
        self.metrics: dict[str, BinaryCalibrationMetric] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for s in self.stages:
            self.metrics[s] = BinaryCalibrationMetric(self.n_bins).to(pl_module.device)

    def _update(self, stage: str, outputs: Any, pl_module: L.LightningModule) -> None:
        if stage not in self.metrics:
            return
        if not isinstance(outputs, dict) or "prob" not in outputs or "target" not in outputs:
            raise RuntimeError(
                f"CalibrationCallback needs {type(pl_module).__name__}.{stage}_step to return a dict with "
                f"'prob' and 'target'; got {type(outputs).__name__}"
            )
        metric = self.metrics[stage].to(pl_module.device)
        metric.update(outputs["prob"].float(), outputs["target"].float())

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update("val", outputs, pl_module)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update("test", outputs, pl_module)

    def _log(self, stage: str, pl_module: L.LightningModule) -> None:
        if stage not in self.metrics:
            return
        m = self.metrics[stage]
        if float(m.n) > 0:
            vals = m.compute()
            pl_module.log_dict({f"{stage}/cal/{k}": float(v) for k, v in vals.items()})
        m.reset()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._log("val", pl_module)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._log("test", pl_module)
