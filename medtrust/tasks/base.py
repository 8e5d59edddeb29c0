"""What every task shares: optimizer/scheduler assembly and weight initialisation from a checkpoint."""
from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn as nn

from medtrust.utils.logging import get_logger

log = get_logger(__name__)


def load_init_weights(module: nn.Module, path: str | Path, key: str = "model.init_from") -> dict[str, list[str]]:
    """Initialise ``module`` from a checkpoint's weights (``weights_only=True``), non-strictly.

    Tensors whose name and shape match are copied; the rest are reported (and logged) so a user
    can see exactly what was not transferred.

    Args:
        module: the task (its ``state_dict`` keys are compared with the checkpoint's).
        path: a Lightning ``.ckpt`` (uses its ``state_dict``) or a plain state-dict file.
        key: config key named in error messages.

    Returns:
        ``{"loaded", "missing", "unexpected", "shape_mismatch"}`` lists of parameter names.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not a checkpoint, or no parameter matched.
    """
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{key}: checkpoint not found: {p}")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip errors differ across torch versions
        raise ValueError(f"{key}: {p} is not a loadable checkpoint with weights_only=True ({err})") from err
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict):
        raise ValueError(f"{key}: {p} holds no state_dict")
    own = module.state_dict()
    loaded = {k: v for k, v in sd.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
    report = {
        "loaded": sorted(loaded),
        "missing": sorted(k for k in own if k not in loaded),
        "unexpected": sorted(k for k in sd if k not in own),
        "shape_mismatch": sorted(k for k, v in sd.items() if k in own and tuple(own[k].shape) != tuple(v.shape)),
    }
    if not loaded:
        raise ValueError(f"{key}: no parameter of {p} matches this model (first keys there: {list(sd)[:5]})")
    module.load_state_dict(loaded, strict=False)
    log.info(f"{key}: loaded {len(loaded)}/{len(own)} tensors from {p}")
    for kind in ("missing", "unexpected", "shape_mismatch"):
        if report[kind]:
            log.warning(f"{key}: {len(report[kind])} {kind} key(s), e.g. {report[kind][:8]}")
    return report


def build_scheduler(factory: Callable[..., Any], optimizer: torch.optim.Optimizer, total_steps: int,
                    total_epochs: int, interval: str) -> Any:
    """Call a partial LR scheduler, filling in its horizon if the config left it out.

    ``total_steps`` (OneCycleLR) and ``T_max`` (CosineAnnealingLR) are set from the trainer's
    length in the unit of ``interval`` (``step`` or ``epoch``).
    """
    params = inspect.signature(getattr(factory, "func", factory)).parameters
    given = getattr(factory, "keywords", {}) or {}
    horizon = max(1, total_steps if interval == "step" else total_epochs)
    extra = {}
    if "total_steps" in params and "total_steps" not in given and "epochs" not in given:
        extra["total_steps"] = horizon
    if "T_max" in params and "T_max" not in given:
        extra["T_max"] = horizon
    return factory(optimizer, **extra)


class TaskBase(L.LightningModule):
    """Shared optimizer assembly for tasks built from Hydra partials.

    Subclasses set ``self.optimizer_factory``, ``self.scheduler_factory``,
    ``self.scheduler_interval`` and ``self.monitor``.
    """

    optimizer_factory: Callable[..., torch.optim.Optimizer]
    scheduler_factory: Callable[..., Any] | None = None
    scheduler_interval: str = "step"
    monitor: str = "val/loss"

    def post_fit(self, datamodule: Any, run_dir: Path, cfg: Any = None) -> dict[str, Any] | None:
        """Hook after training with the best weights loaded (e.g. fit temperature on validation);
        returns what ``evaluate_split`` should receive as ``calibration`` (None = nothing)."""
        return None

    def configure_optimizers(self) -> Any:
        opt = self.optimizer_factory(params=[p for p in self.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return opt
        trainer = self.trainer
        sched = build_scheduler(self.scheduler_factory, opt, int(trainer.estimated_stepping_batches),
                                int(trainer.max_epochs or 1), self.scheduler_interval)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": self.scheduler_interval,
                                                   "monitor": self.monitor}}
