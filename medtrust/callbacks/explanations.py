"""Explanation metrics during validation: localisation and stability of chosen XAI methods on a
fixed, seeded validation subset, every N epochs."""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch

from medtrust.utils.logging import get_logger
from medtrust.xai.methods import ExplanationMethod, run_methods
from medtrust.xai.perturb import perturbed_maps, stability_table
from medtrust.xai.pipeline import (
    build_methods,
    gather,
    localisation_table,
    save_explanation_grid,
    subset_indices,
    summarise,
)

log = get_logger(__name__)
SELECT_KEY = "val/xai/select"


class ExplanationCallback(L.Callback):
    """Logs ``val/xai/<map>/<metric>`` every ``every_n_epochs`` validation epochs (and the last).

    Metrics: localisation against the ground-truth mask (``pointing_game``, ``relevance_mass``,
    ``topk_iou``, ``topk_dice``, ``heatmap_auroc``) and stability against the unperturbed map
    (``<perturbation>_{topk_iou,spearman,com_shift_px}`` for ``mc_dropout``, ``tta``, ``noise``).
    Also ``val/xai/seconds`` (its own cost, for the overhead figure).

    Checkpoint selection by explanation quality: with ``select = {"metric": "val/xai/<map>/<metric>",
    "constraint": "val/seg/dice", "within": 0.01}`` it logs ``val/xai/select`` = the metric when the
    constraint is within ``within`` of its best value so far (on an epoch where explanations were
    measured), else -1; ``ModelCheckpoint(monitor="val/xai/select", mode="max")`` then keeps the
    most stable explanations among checkpoints within 1 Dice point of the best.

    Args:
        methods: methods measured during training (name -> ``_target_`` entry, as ``xai.methods``),
            or built methods.
        target: ``xai.target`` (kind and region/class).
        every_n_epochs: measure every N validation epochs (0 = never).
        n_images: size of the fixed validation subset.
        stability: perturbations (``mc_dropout`` T, ``tta`` flips, ``noise_std``/``n_noise``).
        topk: top-k fraction for top-k overlaps.
        select: optional checkpoint-selection metric (see above).
        seed: subset and perturbation seed.
        figure_dir: where each measurement's explanation grid goes (``xai_epoch_<e>.png``, first
            ``n_figure_images`` images of the subset; also sent to a W&B logger as ``xai/grid``);
            None = no figures.
        n_figure_images: rows of that grid.
    """

    def __init__(self, methods: Any, target: Mapping[str, Any],
                 every_n_epochs: int = 5, n_images: int = 8, stability: Mapping[str, Any] | None = None,
                 topk: float = 0.1, select: Mapping[str, Any] | None = None, seed: int = 0,
                 figure_dir: str | None = None, n_figure_images: int = 4) -> None:
        super().__init__()
        if every_n_epochs < 0 or n_images < 1:
            raise ValueError(f"xai.callback: every_n_epochs must be >= 0 and n_images >= 1, got {every_n_epochs}, {n_images}")
        self.methods: dict[str, ExplanationMethod] = (
            dict(methods) if methods and all(isinstance(m, ExplanationMethod) for m in dict(methods).values())
            else build_methods(methods))
        self.target, self.every = dict(target), int(every_n_epochs)
        self.n_images, self.stability = int(n_images), dict(stability or {})
        self.topk, self.seed = float(topk), int(seed)
        self.figure_dir, self.n_figure_images = (Path(figure_dir) if figure_dir else None), int(n_figure_images)
        self.select = dict(select) if select else None
        if self.select and not {"metric", "constraint", "within"} <= set(self.select):
            raise ValueError(f"xai.callback.select needs metric, constraint and within; got {sorted(self.select)}")
        self._best_constraint: float | None = None
        self._measured = False
        self.seconds: list[float] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for m in self.methods.values():
            m.check(pl_module)  # a method that cannot apply to the task fails before training

    def _due(self, trainer: L.Trainer) -> bool:
        if self.every == 0 or trainer.sanity_checking:
            return False
        e = trainer.current_epoch
        return (e + 1) % self.every == 0 or e + 1 >= (trainer.max_epochs or 0) or e == 0

    def measure(self, pl_module: torch.nn.Module, dm: Any, split: str = "val",
                figure: Path | None = None) -> dict[str, float]:
        """All configured metrics on the fixed subset of ``split``: ``{"<map>/<metric>": mean}``;
        with ``figure``, also the explanation grid of its first images there."""
        n_total = len(dm.dataset(split))
        x, masks, labels, ids = gather(pl_module, dm, split, subset_indices(n_total, self.n_images, self.seed),
                                       self.target, self.seed)
        out: dict[str, float] = {}
        all_maps: dict[str, torch.Tensor] = {}
        with torch.inference_mode(False), torch.enable_grad():
            for method in self.methods.values():
                ref = run_methods({"m": method}, x)
                all_maps.update(ref)
                for name, per in localisation_table(ref, masks, self.topk).items():
                    for metric, vals in per.items():
                        s = summarise(vals)
                        if s["mean"] is not None:
                            out[f"{name}/{metric}"] = s["mean"]
                pert = perturbed_maps(method, x, self.stability) if self.stability else {}
                for name, by in stability_table(ref, pert, self.topk).items():
                    for p, metrics in by.items():
                        for metric, vals in metrics.items():
                            s = summarise(vals)
                            if s["mean"] is not None:
                                out[f"{name}/{p}_{metric}"] = s["mean"]
        if figure is not None:
            k = min(self.n_figure_images, len(ids))
            sub = replace(x, images=x.images[:k], raw=list(x.raw[:k]))  # the grid reads images and raw only
            save_explanation_grid(pl_module, sub, None if masks is None else masks[:k],
                                  None if labels is None else labels[:k], {n: m[:k] for n, m in all_maps.items()},
                                  list(ids[:k]), figure)
        return out

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._measured = False
        if not self._due(trainer) or trainer.datamodule is None:
            return
        t0 = time.perf_counter()
        was = pl_module.training
        pl_module.eval()
        try:
            figure = (self.figure_dir / f"xai_epoch_{trainer.current_epoch:03d}.png"
                      if self.figure_dir is not None and trainer.is_global_zero else None)
            values = self.measure(pl_module, trainer.datamodule, figure=figure)
        finally:
            pl_module.train(was)
        if figure is not None and figure.exists():
            for lg in trainer.loggers:
                if type(lg).__name__ == "WandbLogger":
                    lg.log_image(key="xai/grid", images=[str(figure)], step=trainer.global_step,
                                 caption=[f"epoch {trainer.current_epoch}"])
        dt = time.perf_counter() - t0
        self.seconds.append(dt)
        for k, v in values.items():
            pl_module.log(f"val/xai/{k}", v, sync_dist=True)
        pl_module.log("val/xai/seconds", dt)
        self._measured = True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after the task's own epoch-end logging (the constraint, e.g. val/seg/dice) and before
        # ModelCheckpoint (Lightning runs checkpoint callbacks last)
        if not self.select or trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        c = metrics.get(str(self.select["constraint"]))
        if c is None:
            raise KeyError(f"xai.callback.select.constraint {self.select['constraint']!r} was not logged; "
                           f"logged: {sorted(metrics)}")
        c = float(c)
        mode_max = str(self.select.get("mode", "max")) == "max"
        if self._best_constraint is None or (c > self._best_constraint if mode_max else c < self._best_constraint):
            self._best_constraint = c
        gap = (self._best_constraint - c) if mode_max else (c - self._best_constraint)
        m = metrics.get(str(self.select["metric"]))
        ok = self._measured and m is not None and gap <= float(self.select["within"])
        value = float(m) if ok else -1.0
        trainer.callback_metrics[SELECT_KEY] = torch.tensor(value)
        for lg in trainer.loggers:
            lg.log_metrics({SELECT_KEY: value}, step=trainer.global_step)


def explanation_callbacks(xai_cfg: Any, seed: int = 0, figure_dir: Any = None) -> list[ExplanationCallback]:
    """The callback configured by ``xai.callback`` (none when absent or ``every_n_epochs: 0``); its grids
    go to ``figure_dir`` unless ``xai.callback.figure_images`` is 0."""
    cb = (xai_cfg or {}).get("callback") if xai_cfg is not None else None
    if not cb or int(cb.get("every_n_epochs", 0) or 0) == 0:
        return []
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cb, resolve=True) if not isinstance(cb, dict) else cb
    return [ExplanationCallback(methods=plain["methods"], target=dict(xai_cfg["target"]),
                                every_n_epochs=int(plain["every_n_epochs"]), n_images=int(plain.get("n_images", 8)),
                                stability=plain.get("stability"), topk=float(xai_cfg.get("topk", 0.1)),
                                select=plain.get("select"), seed=seed,
                                figure_dir=figure_dir if int(plain.get("figure_images", 4)) > 0 else None,
                                n_figure_images=int(plain.get("figure_images", 4)) or 4)]
