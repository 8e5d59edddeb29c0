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

from medtrust.evaluation.run_classifier import RunClassifier
from medtrust.utils.logging import get_logger

log = get_logger(__name__)

SCORES = ("expected", "p_top")


class Selector(RunClassifier):
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
        # generated images are resized to the selector's size (it rates whatever the generator makes)
        super().__init__(task, calibration, image_size, channels, normalize, run_dir, seed, resize=True)
        self.scale = (int(scale[0]), int(scale[1]))
        k = self.scale[1] - self.scale[0] + 1
        if int(getattr(task, "num_classes", k)) != k:
            raise ValueError(f"selector run {run_dir}: {task.num_classes} classes but ratings {self.scale[0]}-{self.scale[1]}")

    @classmethod
    def from_run(cls, run_dir: str | Path, checkpoint: str = "best", seed: int = 0) -> Selector:  # type: ignore[override]
        """Rebuild a selector run (its config checked against the allow-list, weights_only loading).

        Raises:
            RunDirError: not a run folder, or not a classifier trained on ratings (``data=ratings``).
        """
        from omegaconf import OmegaConf

        from medtrust.runs.rundir import RunDirError

        cfg, task, calibration = cls.load(run_dir, "selector_run", checkpoint)
        scale = OmegaConf.select(cfg, "data.source.scale")
        if scale is None:
            raise RunDirError(f"selector_run={run_dir}: its data has no rating scale (data.source.scale); expected a "
                              "classifier trained with data=ratings")
        size, channels, norm = cls.preprocessing(cfg)
        return cls(task, calibration, [int(v) for v in scale], size, channels, norm, Path(run_dir), seed)

    def describe(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir) if self.run_dir else None, "method": self.method,
                "temperature": self.temperature, "calibration_fitted_on": self.calibration.get("fitted_on"),
                "scale": list(self.scale)}

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
