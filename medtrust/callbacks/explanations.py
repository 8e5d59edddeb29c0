"""Explanation metrics during validation: localisation and stability of chosen XAI methods on a
fixed, seeded validation subset, every N epochs; optionally, checkpoint selection by explanation
quality under a constraint on the task metric."""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import torch

from medtrust.utils.io import write_json
from medtrust.utils.logging import get_logger
from medtrust.xai.methods import ExplanationMethod, run_methods
from medtrust.xai.perturb import mc_dropout_undefined_reason, perturbed_maps, stability_table
from medtrust.xai.pipeline import (
    build_methods,
    gather,
    localisation_table,
    save_explanation_grid,
    subset_indices,
    summarise,
)

log = get_logger(__name__)
MODES = ("max", "min")
_TOL = 1e-9  # float slack on the margin: 0.90 - 0.89 is 0.010000000000000009, which is "within 0.01"


def constraint_gap(value: float, best: float, mode: str = "max") -> float:
    """How far ``value`` is behind ``best`` (>= 0; 0 = the best), for a constraint maximised or minimised."""
    return (best - value) if mode == "max" else (value - best)


def choose_candidate(candidates: Mapping[int, tuple[float, float | None]], best_constraint: float, within: float,
                     mode: str = "max", metric_mode: str = "max", min_epoch: int = 0) -> int | None:
    """The selection rule: among the candidate epochs whose constraint is within ``within`` of the run's
    best constraint (and that are not before ``min_epoch`` and have a finite metric), the epoch with the
    best explanation metric; ties go to the better constraint, then the earlier epoch.

    Args:
        candidates: epoch -> (constraint value, explanation metric or None when undefined).
        best_constraint: the best constraint value over the whole run (every validation epoch).
        within: margin, in the constraint's units (0.01 = one Dice point).
        mode: ``max`` or ``min``, the constraint's direction.
        metric_mode: ``max`` or ``min``, the explanation metric's direction.
        min_epoch: epochs before it are never chosen (warm-up).

    Returns:
        The chosen epoch, or None when no candidate qualifies.

    Raises:
        ValueError: a mode not in ``max``/``min`` or a negative ``within``.
    """
    if mode not in MODES or metric_mode not in MODES or within < 0:
        raise ValueError(f"choose_candidate: mode and metric_mode must be one of {MODES} and within >= 0; "
                         f"got {mode!r}, {metric_mode!r}, {within}")
    ok = [(e, c, m) for e, (c, m) in candidates.items()
          if e >= min_epoch and m is not None and math.isfinite(m)
          and constraint_gap(c, best_constraint, mode) <= within + _TOL]
    if not ok:
        return None
    sm, sc = (1 if metric_mode == "max" else -1), (1 if mode == "max" else -1)
    return max(ok, key=lambda t: (sm * t[2], sc * t[1], -t[0]))[0]


class ExplanationCallback(L.Callback):
    """Logs ``val/xai/<map>/<metric>`` every ``every_n_epochs`` validation epochs (and the first and last).

    Metrics: localisation against the ground-truth mask (``pointing_game``, ``relevance_mass``,
    ``topk_iou``, ``topk_dice``, ``heatmap_auroc``) and stability against the unperturbed map
    (``<perturbation>_{topk_iou,spearman,com_shift_px}`` for ``mc_dropout``, ``tta``, ``noise``).
    Also ``val/xai/seconds`` (its own cost, for the overhead figure). MC-dropout stability is
    undefined for a model without a dropout module with p > 0: nothing is logged for it, the reason is
    logged once and kept in ``undefined`` (and in ``xai_selection.json``).

    Checkpoint selection by explanation quality, ``select = {"metric": "val/xai/<map>/<metric>",
    "constraint": "val/seg/dice", "within": 0.01}`` (optional ``mode`` of the constraint, ``max``;
    ``metric_mode``, ``max``; ``min_epoch``, 0): the selected checkpoint is the measured epoch with the
    best explanation metric among the epochs whose constraint is within ``within`` of the best
    constraint over the WHOLE run (not the best so far: with "so far", the always-measured epoch 0
    trivially qualifies and a stable but useless model wins). How:

    - the constraint is read at every validation epoch (measured or not), so the run's best is known
      at the end;
    - at every measured epoch >= ``min_epoch`` still within the margin of the best so far, a candidate
      ``<run>/checkpoints/xai_candidates/epoch_<eee>.ckpt`` is saved (``trainer.save_checkpoint``, on
      every rank; rank 0 writes; weights, hyper-parameters and epoch, no optimizer state); a candidate
      whose constraint falls more than ``within`` behind the best so far is deleted, since the best
      only improves and it can never qualify again;
    - at the end of fit, :func:`choose_candidate` picks the epoch, which is copied atomically to
      ``<run>/checkpoints/xai_selected.ckpt``; the remaining candidates are deleted; every measured
      epoch (constraint, metric, kept/pruned), the run's best, the margin and the choice and its reason
      (or why none qualified) go to ``<run>/metrics/xai_selection.json``;
    - :func:`selected_checkpoint` returns that file (None when nothing qualified), for ``train.py`` to
      evaluate instead of ``ModelCheckpoint``'s best.

    ``<run>`` is ``trainer.default_root_dir`` (``train.py`` sets it to the run folder, where
    ``ModelCheckpoint`` writes too; a warning says so when a ``ModelCheckpoint`` writes elsewhere). It is
    known on every rank before training and does not depend on loggers. The selection state is part
    of the callback's ``state_dict``, so a resumed run continues it. One validation per epoch is
    assumed (a second one in the same epoch replaces the first).

    Args:
        methods: methods measured during training (name -> ``_target_`` entry, as ``xai.methods``),
            or built methods.
        target: ``xai.target`` (kind and region/class).
        every_n_epochs: measure every N validation epochs (0 = never).
        n_images: size of the fixed validation subset.
        stability: perturbations (``mc_dropout`` T, ``tta`` flips, ``noise_std``/``n_noise``).
        topk: top-k fraction for top-k overlaps.
        select: optional checkpoint selection (see above).
        seed: subset and perturbation seed.
        figure_dir: where each measurement's explanation grid goes (``xai_epoch_<e>.png``, first
            ``n_figure_images`` images of the subset; also sent to a W&B logger as ``xai/grid``);
            None = no figures.
        n_figure_images: rows of that grid.

    Raises:
        ValueError: bad ``every_n_epochs``/``n_images``, or a ``select`` without ``metric``,
            ``constraint``, ``within``, with an unknown key or mode, a negative margin or
            ``min_epoch``, a metric outside ``val/xai/``, ``com_shift_px`` maximised, or with
            ``every_n_epochs: 0``.
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
        self.select = _check_select(select, self.every) if select else None
        self.undefined: dict[str, str] = {}  # perturbation -> why its stability is undefined for this model
        self.selected: Path | None = None  # set at the end of fit (see selected_checkpoint)
        self.selection: dict[str, Any] | None = None  # what xai_selection.json holds
        self._history: dict[int, float] = {}  # epoch -> constraint, every validation epoch
        self._records: dict[int, dict[str, Any]] = {}  # measured epoch -> constraint, metric, checkpoint, note
        self._measured: set[str] = set()  # keys measured this validation epoch ("<map>/<metric>")
        self.seconds: list[float] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for m in self.methods.values():
            m.check(pl_module)  # a method that cannot apply to the task fails before training

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        reason = mc_dropout_undefined_reason(pl_module) if int(self.stability.get("mc_dropout") or 0) > 0 else None
        if reason is not None:
            self._note_undefined({"mc_dropout": reason})
        if not self.select:
            return
        metric = self.select["metric"]
        if reason is not None and "/mc_dropout_" in metric:
            raise ValueError(f"xai.callback.select.metric {metric!r}: MC-dropout stability is {reason}")
        ckpt_dir = getattr(trainer.checkpoint_callback, "dirpath", None)
        if ckpt_dir and Path(ckpt_dir).resolve() != (self._run_dir(trainer) / "checkpoints").resolve():
            log.warning(f"xai selection writes to {self._run_dir(trainer)}/checkpoints (trainer.default_root_dir), "
                        f"ModelCheckpoint to {ckpt_dir}")

    def _due(self, trainer: L.Trainer) -> bool:
        if self.every == 0 or trainer.sanity_checking:
            return False
        e = trainer.current_epoch
        return (e + 1) % self.every == 0 or e + 1 >= (trainer.max_epochs or 0) or e == 0

    def _note_undefined(self, undefined: Mapping[str, str]) -> None:
        for p, why in undefined.items():
            if p not in self.undefined:  # once per run
                self.undefined[p] = why
                log.warning(f"xai.callback: {p} stability not logged, {why}")

    def measure(self, pl_module: torch.nn.Module, dm: Any, split: str = "val",
                figure: Path | None = None) -> dict[str, float]:
        """All configured metrics on the fixed subset of ``split``: ``{"<map>/<metric>": mean}``;
        with ``figure``, also the explanation grid of its first images there. A perturbation that is
        undefined for the model (``mc_dropout`` without dropout p > 0) has no entry; why is in
        ``self.undefined``."""
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
                self._note_undefined(getattr(pert, "undefined", {}))
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
        self._measured = set()
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
        self._measured = set(values)

    # ---- checkpoint selection -------------------------------------------------------------------

    @staticmethod
    def _run_dir(trainer: L.Trainer) -> Path:
        return Path(trainer.default_root_dir)

    def _qualifies(self, constraint: float, best: float) -> bool:
        return constraint_gap(constraint, best, self.select["mode"]) <= self.select["within"] + _TOL

    def _best(self) -> tuple[int, float]:
        sign = 1 if self.select["mode"] == "max" else -1
        return max(self._history.items(), key=lambda t: (sign * t[1], -t[0]))  # ties: the earlier epoch

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after the task's own epoch-end logging (the constraint, e.g. val/seg/dice) and before
        # ModelCheckpoint (Lightning runs checkpoint callbacks last), so last.ckpt holds this state
        if not self.select or trainer.sanity_checking:
            return
        sel, metrics, e = self.select, trainer.callback_metrics, int(trainer.current_epoch)
        c = metrics.get(sel["constraint"])
        if c is None:
            raise KeyError(f"xai.callback.select.constraint {sel['constraint']!r} was not logged; "
                           f"logged: {sorted(metrics)}")
        self._history[e] = float(c)
        best_epoch, best = self._best()
        for rec in self._records.values():  # the best only improves: these can never qualify again
            if rec["checkpoint"] and not self._qualifies(rec["constraint"], best):
                trainer.strategy.remove_checkpoint(rec["checkpoint"])  # rank 0 deletes
                rec["checkpoint"] = None
                rec["note"] = (f"pruned at epoch {e}: more than {sel['within']} behind the best "
                               f"{sel['constraint']} {best:.4f} (epoch {best_epoch})")
        if not self._measured:
            return
        key = sel["metric"].removeprefix("val/xai/")
        m = float(metrics[sel["metric"]]) if key in self._measured else None  # callback_metrics keeps old epochs
        rec = {"epoch": e, "constraint": float(c), "metric": m, "checkpoint": None}
        if e < sel["min_epoch"]:
            rec["note"] = f"warm-up: before select.min_epoch {sel['min_epoch']}"
        elif m is None or not math.isfinite(m):
            rec["note"] = "metric undefined this epoch (not logged)"
        elif not self._qualifies(float(c), best):
            rec["note"] = (f"not saved: already more than {sel['within']} behind the best {sel['constraint']} "
                           f"{best:.4f} (epoch {best_epoch})")
        elif trainer.fast_dev_run:
            rec["note"] = "not saved: fast_dev_run"
        else:
            path = self._run_dir(trainer) / "checkpoints" / "xai_candidates" / f"epoch_{e:03d}.ckpt"
            # every rank (a barrier inside), rank 0 writes; weights only: it is evaluated, never resumed
            trainer.save_checkpoint(path, weights_only=True)
            rec["checkpoint"], rec["note"] = str(path), "candidate"
        self._records[e] = rec

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.select:
            return
        sel = self.select
        cands = {e: (r["constraint"], r["metric"]) for e, r in self._records.items() if r["checkpoint"]}
        best_epoch, best = self._best() if self._history else (None, None)
        chosen = None if best is None else choose_candidate(cands, best, sel["within"], sel["mode"],
                                                           sel["metric_mode"], sel["min_epoch"])
        run = self._run_dir(trainer)
        target = run / "checkpoints" / "xai_selected.ckpt"
        selected: str | None = None
        if trainer.is_global_zero:
            reason = self._reason(chosen, best_epoch, best, cands)
            if chosen is not None:
                src = Path(self._records[chosen]["checkpoint"])
                if src.is_file():
                    _atomic_copy(src, target)
                    selected = str(target)
                else:
                    reason = f"candidate {src} of epoch {chosen} is missing; nothing selected"
                    chosen = None
            shutil.rmtree(run / "checkpoints" / "xai_candidates", ignore_errors=True)  # the choice is copied
            for rec in self._records.values():
                if rec["checkpoint"]:
                    rec["checkpoint"], rec["note"] = None, "candidate (file deleted after the selection)"
            self.selection = {
                "metric": sel["metric"], "metric_mode": sel["metric_mode"], "constraint": sel["constraint"],
                "mode": sel["mode"], "within": sel["within"], "min_epoch": sel["min_epoch"],
                "best_constraint": best, "best_constraint_epoch": best_epoch,
                "constraint_by_epoch": {str(k): v for k, v in sorted(self._history.items())},
                "candidates": [{**r, "qualifies": best is not None and r["epoch"] >= sel["min_epoch"]
                                and r["metric"] is not None and math.isfinite(r["metric"])
                                and self._qualifies(r["constraint"], best)}
                               for _, r in sorted(self._records.items())],
                "chosen_epoch": chosen, "checkpoint": selected, "reason": reason,
                "undefined": dict(self.undefined)}
            write_json(run / "metrics" / "xai_selection.json", self.selection)
            log.info(f"xai selection: {reason}")
        selected = trainer.strategy.broadcast(selected, src=0)
        self.selected = Path(selected) if selected else None

    def _reason(self, chosen: int | None, best_epoch: int | None, best: float | None,
                cands: Mapping[int, tuple[float, float | None]]) -> str:
        sel = self.select
        if best is None:
            return "no validation epoch ran"
        scope = f"within {sel['within']} of the run's best {sel['constraint']} {best:.4f} (epoch {best_epoch})"
        if chosen is not None:
            n = sum(self._qualifies(c, best) for c, _ in cands.values())
            return (f"epoch {chosen}: the {'highest' if sel['metric_mode'] == 'max' else 'lowest'} {sel['metric']} "
                    f"({cands[chosen][1]:.4f}) of {n} measured epoch(s) {scope}")
        measured = [r for r in self._records.values() if r["epoch"] >= sel["min_epoch"]]
        if not measured:
            return f"no explanation measurement at or after select.min_epoch {sel['min_epoch']}"
        if all(r["metric"] is None for r in measured):
            return f"{sel['metric']} was never logged at a measured epoch (typo, or undefined on every image)"
        return f"no measured epoch with {sel['metric']} is {scope}"

    def state_dict(self) -> dict[str, Any]:
        return {"history": dict(self._history), "records": {e: dict(r) for e, r in self._records.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._history = {int(e): float(c) for e, c in state_dict.get("history", {}).items()}
        self._records = {int(e): dict(r) for e, r in state_dict.get("records", {}).items()}


def _check_select(select: Mapping[str, Any], every: int) -> dict[str, Any]:
    sel = dict(select)
    allowed = {"metric", "constraint", "within", "mode", "metric_mode", "min_epoch"}
    if not {"metric", "constraint", "within"} <= set(sel) or set(sel) - allowed:
        raise ValueError(f"xai.callback.select needs metric, constraint and within (optional mode, metric_mode, "
                         f"min_epoch); got {sorted(sel)}")
    sel = {"mode": "max", "metric_mode": "max", "min_epoch": 0, **sel}
    sel["metric"], sel["constraint"] = str(sel["metric"]), str(sel["constraint"])
    sel["within"], sel["min_epoch"] = float(sel["within"]), int(sel["min_epoch"])
    if sel["mode"] not in MODES or sel["metric_mode"] not in MODES:
        raise ValueError(f"xai.callback.select: mode and metric_mode must be one of {MODES}; "
                         f"got {sel['mode']!r}, {sel['metric_mode']!r}")
    if sel["within"] < 0 or sel["min_epoch"] < 0:
        raise ValueError(f"xai.callback.select: within and min_epoch must be >= 0; "
                         f"got {sel['within']}, {sel['min_epoch']}")
    if not sel["metric"].startswith("val/xai/"):
        raise ValueError(f"xai.callback.select.metric must be a val/xai/<map>/<metric> key; got {sel['metric']!r}")
    if sel["metric"].endswith("com_shift_px") and sel["metric_mode"] == "max":
        raise ValueError(f"xai.callback.select.metric {sel['metric']!r} is lower-is-better: set metric_mode: min")
    if every == 0:
        raise ValueError("xai.callback.select needs every_n_epochs > 0 (explanations are never measured)")
    return sel


def _atomic_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def selected_checkpoint(trainer: L.Trainer) -> Path | None:
    """The checkpoint chosen by an :class:`ExplanationCallback` with ``select`` in ``trainer`` after fit
    (``<run>/checkpoints/xai_selected.ckpt``), or None: no such callback, fit did not finish, or no
    measured epoch qualified (``metrics/xai_selection.json`` says why). ``train.py`` evaluates it
    instead of ``ModelCheckpoint``'s best when it is not None."""
    for cb in trainer.callbacks:
        if isinstance(cb, ExplanationCallback) and cb.select and cb.selected is not None:
            return cb.selected
    return None


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
