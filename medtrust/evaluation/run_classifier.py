"""A trained classifier run, ready to score images from elsewhere (generated images, another data set):
the quality selector of the generator and the audit's independent classifiers are both this.

Its probabilities are the run's primary uncertainty method (MC dropout by default) scaled by the
temperature fitted on its calibration split (``calibration.json``): the probabilities its own evaluation
reports. Images must match the run's preprocessing (size and channels) unless ``resize`` is set; then
they are converted (RGB <-> grayscale) and resized with antialiasing, and ``describe()`` says so.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

CLASSIFIER_TARGET = "medtrust.tasks.classification.ClassificationTask"


def run_classes(cfg: Any) -> list[str] | None:
    """The class names of a classifier run, from its data config: ``data.class_names`` when given, else
    what the phantom CXR source's ``target`` means; None when the config does not say."""
    from omegaconf import OmegaConf

    names = OmegaConf.select(cfg, "data.class_names")
    if names:
        return [str(n) for n in names]
    src = str(OmegaConf.select(cfg, "data.source._target_") or "")
    target = OmegaConf.select(cfg, "data.source.target")
    if src.endswith("PhantomCxrSource"):
        if target == "finding":
            return ["no_finding", "pneumonia", "covid"]
        return [f"no_{target}", str(target)]
    return None


class RunClassifier:
    """A rebuilt classifier run (:class:`~medtrust.tasks.classification.ClassificationTask`).

    Args:
        task: the rebuilt task; calibration: its ``calibration.json`` (None: unscaled, deterministic).
        image_size, channels, normalize: its data preprocessing.
        run_dir: where it came from; seed: of the MC-dropout masks (same images, same probabilities).
        classes: its class names (None: unknown); resize: convert other sizes / channels instead of refusing.
    """

    def __init__(self, task: Any, calibration: dict[str, Any] | None, image_size: Sequence[int], channels: int,
                 normalize: dict[str, Sequence[float]] | None, run_dir: Path | None = None, seed: int = 0,
                 classes: Sequence[str] | None = None, resize: bool = False) -> None:
        self.task = task.eval()
        self.calibration = dict(calibration or {})
        self.image_size = [int(s) for s in image_size]
        self.channels, self.normalize = int(channels), normalize
        self.run_dir, self.seed, self.resize = run_dir, int(seed), bool(resize)
        self.classes = list(classes) if classes else None
        self.method = str(self.calibration.get("primary_method") or "deterministic")
        self.temperature = float((self.calibration.get("temperatures") or {}).get(self.method, 1.0)) \
            if self.calibration.get("calibrated", True) else 1.0

    @staticmethod
    def load(run_dir: str | Path, key: str, checkpoint: str = "best") -> tuple[Any, Any, dict[str, Any]]:
        """``(run config, rebuilt task, calibration)`` of a classifier run (config checked against the
        allow-list, weights_only loading).

        Raises:
            RunDirError: not a run folder, or not a classifier run.
        """
        from medtrust.evaluation.classification import load_calibration
        from medtrust.runs.builders import rebuild_task
        from medtrust.runs.rundir import RunDirError, check_run_dir, find_checkpoint, load_run_config

        run_dir = check_run_dir(run_dir, key)
        cfg = load_run_config(run_dir)
        if cfg.model.get("_target_") != CLASSIFIER_TARGET:
            raise RunDirError(f"{key}={run_dir}: a {cfg.model.get('_target_')} run; expected a classifier run "
                              "(python train.py model=resnet_classifier ...)")
        return cfg, rebuild_task(cfg, find_checkpoint(run_dir, checkpoint)), load_calibration(run_dir) or {}

    @staticmethod
    def preprocessing(cfg: Any) -> tuple[list[int], int, dict[str, Any] | None]:
        from omegaconf import OmegaConf

        data = OmegaConf.to_container(cfg.data, resolve=False)
        size = data["image_size"]
        norm = data.get("normalize")
        return ([int(size)] * 2 if isinstance(size, int) else [int(s) for s in size], int(data["channels"]),
                dict(norm) if norm else None)

    @classmethod
    def from_run(cls, run_dir: str | Path, key: str = "classifier", checkpoint: str = "best", seed: int = 0,
                 resize: bool = False) -> RunClassifier:
        cfg, task, calibration = cls.load(run_dir, key, checkpoint)
        size, channels, norm = cls.preprocessing(cfg)
        return cls(task, calibration, size, channels, norm, Path(run_dir), seed, run_classes(cfg), resize)

    def describe(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir) if self.run_dir else None, "method": self.method,
                "temperature": self.temperature, "calibration_fitted_on": self.calibration.get("fitted_on"),
                "classes": self.classes, "image_size": self.image_size, "channels": self.channels,
                "resize": self.resize}

    def check_images(self, images: torch.Tensor, where: str) -> None:
        """Refuse images of another size or channel count than the run was trained on (unless ``resize``).

        Raises:
            ValueError: naming ``where``, the images' and the run's preprocessing.
        """
        if self.resize:
            return
        if images.shape[1] != self.channels or list(images.shape[-2:]) != self.image_size:
            raise ValueError(f"{where}: images of {images.shape[1]} channel(s) at {list(images.shape[-2:])}, but "
                             f"classifier {self.run_dir} was trained on {self.channels} channel(s) at {self.image_size}; "
                             "its preprocessing does not match (set resize=true to convert them, logged)")

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
    def sample_probabilities(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Calibrated probabilities of every stochastic pass: S×N×K (S = MC samples or ensemble members, 1
        for a deterministic run), images N×C×H×W in [0, 1]."""
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
                out.append(torch.softmax(logits.double() / self.temperature, -1).float().cpu())
        k = int(getattr(self.task, "num_classes", 2))
        return torch.cat(out, dim=1) if out else torch.empty(1, 0, k)

    def probabilities(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Calibrated probabilities, N×K (the mean over the stochastic passes)."""
        return self.sample_probabilities(images, batch_size).mean(0)
