"""MINIM's quality selector, applied: a classifier run trained on ratings (``experiment=minim_selector``,
``data=ratings``) scores generated images.

The selector is an ordinary classifier run: its probabilities are the run's primary uncertainty method
(MC dropout by default) scaled by the temperature fitted on its calibration split
(``calibration.json``), the same probabilities its own evaluation reports. A rating ``r`` of the
run's scale ``[lo, hi]`` is class ``r - lo``; an image's score is its expected rating
``sum_k p_k (lo + k)`` (``score: expected``) or the probability of the top rating (``score: p_top``).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medtrust.utils.logging import get_logger

log = get_logger(__name__)

SCORES = ("expected", "p_top")


class Selector:
    """A rating classifier run, ready to score images.

    Args:
        task: the rebuilt :class:`~medtrust.tasks.classification.ClassificationTask`.
        calibration: its ``calibration.json`` (None: unscaled, deterministic).
        scale: the lowest and highest rating of its ratings data.
        image_size, channels, normalize: its data preprocessing.
        run_dir: where it came from (recorded next to every score).
        seed: seed of the MC-dropout masks (the same images get the same scores).
    """

    def __init__(self, task: Any, calibration: dict[str, Any] | None, scale: Sequence[int], image_size: Sequence[int],
                 channels: int, normalize: dict[str, Sequence[float]] | None, run_dir: Path | None = None,
                 seed: int = 0) -> None:
        self.task = task.eval()
        self.calibration = dict(calibration or {})
        self.scale = (int(scale[0]), int(scale[1]))
        k = self.scale[1] - self.scale[0] + 1
        if int(getattr(task, "num_classes", k)) != k:
            raise ValueError(f"selector run {run_dir}: {task.num_classes} classes but ratings {self.scale[0]}-{self.scale[1]}")
        self.image_size = [int(s) for s in image_size]
        self.channels, self.normalize = int(channels), normalize
        self.run_dir, self.seed = run_dir, int(seed)
        self.method = str(self.calibration.get("primary_method") or "deterministic")
        self.temperature = float((self.calibration.get("temperatures") or {}).get(self.method, 1.0)) \
            if self.calibration.get("calibrated", True) else 1.0

    @classmethod
    def from_run(cls, run_dir: str | Path, checkpoint: str = "best", seed: int = 0) -> Selector:
        """Rebuild a selector run (its config checked against the allow-list, weights_only loading).

        Raises:
            RunDirError: not a run folder, or not a classifier trained on ratings (``data=ratings``).
        """
        from omegaconf import OmegaConf

        from medtrust.evaluation.classification import load_calibration
        from medtrust.runs.builders import rebuild_task
        from medtrust.runs.rundir import RunDirError, check_run_dir, find_checkpoint, load_run_config

        run_dir = check_run_dir(run_dir, "selector_run")
        cfg = load_run_config(run_dir)
        if cfg.model.get("_target_") != "medtrust.tasks.classification.ClassificationTask":
            raise RunDirError(f"selector_run={run_dir}: a {cfg.model.get('_target_')} run; expected a classifier "
                              "trained on ratings (python train.py experiment=minim_selector data.ratings=<csv>)")
        scale = OmegaConf.select(cfg, "data.source.scale")
        if scale is None:
            raise RunDirError(f"selector_run={run_dir}: its data has no rating scale (data.source.scale); expected a "
                              "classifier trained with data=ratings")
        data = OmegaConf.to_container(cfg.data, resolve=False)
        size = data["image_size"]
        task = rebuild_task(cfg, find_checkpoint(run_dir, checkpoint))
        norm = data.get("normalize")
        return cls(task, load_calibration(run_dir), [int(v) for v in scale],
                   [int(size)] * 2 if isinstance(size, int) else [int(s) for s in size], int(data["channels"]),
                   dict(norm) if norm else None, run_dir, seed)

    def describe(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir) if self.run_dir else None, "method": self.method,
                "temperature": self.temperature, "calibration_fitted_on": self.calibration.get("fitted_on"),
                "scale": list(self.scale)}

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().clamp(0, 1)
        if x.shape[1] != self.channels:
            x = x.mean(1, keepdim=True) if self.channels == 1 else x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        if list(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", antialias=True, align_corners=False)
        if self.normalize:
            mean = torch.tensor(self.normalize["mean"], dtype=x.dtype)[None, :, None, None]
            std = torch.tensor(self.normalize["std"], dtype=x.dtype)[None, :, None, None]
            x = (x - mean) / std
        return x

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Calibrated rating probabilities: N×C×H×W images in [0, 1] -> N×K."""
        out = []
        dev = next(self.task.parameters()).device
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            for i in range(0, len(images), batch_size):
                x = self._prepare(images[i:i + batch_size]).to(dev)
                if self.method == "mc_dropout":
                    logits = self.task.mc_logits(x)
                elif self.method == "ensemble":
                    logits = self.task.member_logits(x)
                else:
                    logits = self.task.member_logits(x)[:1]
                out.append(torch.softmax(logits.double() / self.temperature, -1).mean(0).float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.scale[1] - self.scale[0] + 1)

    def score(self, images: torch.Tensor, kind: str = "expected") -> tuple[np.ndarray, np.ndarray]:
        """``(score, p_top)`` of each image; ``score`` is the expected rating or ``p_top``.

        Raises:
            ValueError: an unknown ``kind``.
        """
        if kind not in SCORES:
            raise ValueError(f"selector score {kind!r}; expected one of {SCORES}")
        p = self.probabilities(images).double()
        ratings = torch.arange(self.scale[0], self.scale[1] + 1, dtype=torch.double)
        expected = (p * ratings).sum(1).numpy()
        p_top = p[:, -1].numpy()
        return (expected if kind == "expected" else p_top), p_top
