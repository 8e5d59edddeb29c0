"""Calibration measured during validation/test from the task's own forward pass."""
from __future__ import annotations

from typing import Any

import lightning as L

from medtrust.metrics.calibration import BinaryCalibrationMetric

# kind -> (the step-output keys it reads, metric name -> logged name)
KINDS = {
    "positive": (("prob", "target"), {"ece": "ece_positive", "mce": "mce_positive", "brier": "brier"}),
    "top_label": (("confidence", "correct"), {"ece": "ece_top_label", "mce": "mce_top_label"}),
}


class CalibrationCallback(L.Callback):
    """Logs calibration each validation (and test) epoch, under names that say what it measures:

    - ``<stage>/cal/{ece_positive,mce_positive,brier}`` from ``{"prob", "target"}`` in the step
      output: a positive-class probability against its {0, 1} label (a segmenter's pixels, a binary
      classifier's images);
    - ``<stage>/cal/{ece_top_label,mce_top_label}`` from ``{"confidence", "correct"}``: the predicted
      class's confidence against correctness (classifiers with any number of classes).

    A task returns either pair or both from ``validation_step``/``test_step``.

    Args:
        n_bins: equal-width confidence bins.
        stages: stages to measure (``val``, ``test``).
    """

    def __init__(self, n_bins: int = 15, stages: tuple[str, ...] = ("val", "test")) -> None:
        super().__init__()
        self.n_bins, self.stages = int(n_bins), tuple(stages)
        self.metrics: dict[tuple[str, str], BinaryCalibrationMetric] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.metrics = {(s, k): BinaryCalibrationMetric(self.n_bins).to(pl_module.device)
                        for s in self.stages for k in KINDS}

    def _update(self, stage: str, outputs: Any, pl_module: L.LightningModule) -> None:
        if stage not in self.stages:
            return
        found = False
        for kind, ((p, t), _) in KINDS.items():
            if isinstance(outputs, dict) and p in outputs and t in outputs:
                found = True
                self.metrics[(stage, kind)].to(pl_module.device).update(outputs[p].float(), outputs[t].float())
        if not found:
            raise RuntimeError(
                f"CalibrationCallback needs {type(pl_module).__name__}.{stage}_step to return a dict with "
                f"'prob' and 'target' (positive class) or 'confidence' and 'correct' (top label); got "
                f"{sorted(outputs) if isinstance(outputs, dict) else type(outputs).__name__} (or use callbacks "
                "without `calibration` for this task)")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update("val", outputs, pl_module)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update("test", outputs, pl_module)

    def _log(self, stage: str, pl_module: L.LightningModule) -> None:
        for kind, (_, names) in KINDS.items():
            m = self.metrics.get((stage, kind))
            if m is None:
                continue
            if float(m.n) > 0:
                vals = m.compute()
                pl_module.log_dict({f"{stage}/cal/{names[k]}": float(v) for k, v in vals.items() if k in names})
            m.reset()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._log("val", pl_module)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._log("test", pl_module)
