"""The task contract: what every task provides, so that ``runs/``, ``report/``, ``xai/`` and
``evaluate.py`` never branch on a task's name.

A task is a LightningModule (segmentation, classification, and next anomaly detection and
generation). Everything that differs between tasks lives with the task, behind :class:`Task`:

============================================  =============================================
the task provides                              used by
============================================  =============================================
``task_name``, ``metric_group``                run folders, summary.csv, W&B, report tables
``post_fit`` / ``load_post_fit``               train.py after fit; evaluate.py, compare
``evaluate_split`` -> :class:`EvalResult`      train.py, evaluate.py
``report_sections`` (its own Jinja2 templates)  ``report/html.py``
``trust_summary`` -> :class:`TrustLine` s       the report's first table
``xai_target_kinds``, ``fix_xai_target``,      ``xai/``, explain.py, the explanation callback
``explain_target``, ``explain_outcome``,
``explain_view``
``compare``                                    ``evaluate.py run_dirs=[...]``
``ensemble_of`` (optional)                     ``evaluate.py ensemble_runs=[...]``
``score_ood`` (optional)                       ``evaluate.py ood.sets=[...]``
``evaluate_shift`` (optional)                  ``evaluate.py shift=corruptions``, ``shift.prevalence=[...]``
``evaluation_config`` + the model config's      ``conf/evaluation/<task>.yaml`` and
defaults (``/evaluation``, ``/callbacks``)     ``conf/callbacks/<task>.yaml``
============================================  =============================================

:class:`TaskBase` implements the shared parts (optimizer assembly, weight initialisation, the
defaults of the optional members). A new task subclasses it and fills in the abstract methods; the
toy reconstruction task in ``tests/toy/`` is the proof that the generic paths need nothing more.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import lightning as L
import torch
import torch.nn as nn

from medtrust.utils.io import load_tensors
from medtrust.utils.logging import get_logger

log = get_logger(__name__)


# -- what tasks return ------------------------------------------------------------------------
@dataclass
class EvalResult:
    """The evaluation of one split, as written to ``metrics/<split>.json``.

    Attributes:
        split: the evaluated split (``val``, ``test``, ``cal``, ...).
        task: the task's ``task_name``.
        metric_group: the task's metric prefix (``seg``, ``cls``, ...).
        metrics: the JSON payload. Scalar metric groups are the keys listed in
            ``metrics["metric_groups"]`` (each a dict ``name -> float``); the rest is context
            (``n_images``, ``data``, ``subgroups``, what was fitted where, ...).
        tables: name -> CSV written for this split (per-image scores, predictions, subgroups);
            W&B logs them as tables.
        figures: PNGs written for this split.
    """

    split: str
    task: str
    metric_group: str
    metrics: dict[str, Any]
    tables: dict[str, Path] = field(default_factory=dict)
    figures: list[Path] = field(default_factory=list)

    def scalars(self, include_counts: bool = False) -> dict[str, float]:
        """``{"<group>/<name>": value}`` of every scalar metric (see :func:`scalar_metrics`)."""
        from medtrust.report.summary import scalar_metrics

        return scalar_metrics(self.metrics, include_counts=include_counts)

    def value(self, group: str, name: str) -> float | None:
        """One scalar, e.g. ``value("seg", "dice")`` (None when absent)."""
        v = (self.metrics.get(group) or {}).get(name)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


@dataclass
class TrustLine:
    """One line of the trust summary at the top of a report: one trust axis the task measures.

    Attributes:
        axis: ``accuracy``, ``calibration``, ``subgroups``, ``explanations``, later ``artifacts``
            and ``hallucinations``.
        figure: the figure in words, e.g. ``"ECE (top-label) 0.031"``.
        value: the point estimate (None when not measured).
        ci: its 95 % CI ``(low, high)`` or None.
        fitted_on: what the figure's fitted parts (weights, temperature, threshold, checkpoint)
            were fitted / chosen on.
        reported_on: the images it is computed on, e.g. ``"test (118 images)"``.
        verdict: ``meets``, ``fails``, ``inconclusive`` (the CI straddles the threshold),
            ``in-sample`` (fitted and reported on the same images) or ``not measured``.
        text: the plain-language line, e.g. ``"calibrated: ECE 0.03 [0.02, 0.05] ≤ 0.05"``.
        threshold: the threshold from the evaluation config the verdict is against.
    """

    axis: str
    figure: str
    value: float | None
    ci: tuple[float, float] | None
    fitted_on: str
    reported_on: str
    verdict: str
    text: str
    threshold: str = ""


@dataclass
class ReportSection:
    """A block of the HTML report rendered from a Jinja2 template (autoescaped).

    Attributes:
        template: template name, looked up in ``search_path`` and then in ``medtrust/report/templates``.
        context: variables of the template.
        search_path: folders with the task's own templates (a task adds a section by adding a template).
    """

    template: str
    context: dict[str, Any] = field(default_factory=dict)
    search_path: Sequence[Path] = ()


@dataclass
class RunModel:
    """A trained run rebuilt for comparison: its folder, a label, the task and what it fitted."""

    run_dir: Path
    label: str
    task: Any
    fitted: dict[str, Any] | None


# -- the contract ------------------------------------------------------------------------------
@runtime_checkable
class Task(Protocol):
    """What shared code may call on a task (and nothing else)."""

    task_name: str
    metric_group: str
    evaluation_config: str
    xai_target_kinds: tuple[str, ...]
    has_pixel_probabilities: bool   # explain_view gives per-pixel probabilities (SLIC confidence)

    def check_data(self, datamodule: Any, evaluation: Any = None) -> None:
        """Before training, with train/val loaded: refuse splits this task cannot use (e.g. a classifier's val
        holding one class), naming the split; nothing to check by default."""

    def post_fit(self, datamodule: Any, run_dir: Path, evaluation: Any = None) -> dict[str, Any] | None:
        """After training, with the selected weights loaded: fit what evaluation needs (temperature,
        thresholds, residual statistics) on data the model did not train on, write it into
        ``run_dir`` and return it (None: nothing to fit)."""

    @classmethod
    def load_post_fit(cls, run_dir: Path) -> dict[str, Any] | None:
        """What :meth:`post_fit` wrote into ``run_dir`` (None when nothing)."""

    def evaluate_split(self, datamodule: Any, split: str, out_dir: Path, evaluation: Any = None,
                       extra: Mapping[str, Any] | None = None,
                       fitted: Mapping[str, Any] | None = None) -> EvalResult:
        """Evaluate one split into ``out_dir`` (``metrics/<split>.json``, tables, figures)."""

    @classmethod
    def report_sections(cls, run_dir: Path, metrics: Mapping[str, Mapping[str, Any]]) -> list[ReportSection]:
        """The task's own report blocks from what ``run_dir`` holds (``metrics``: split -> JSON)."""

    @classmethod
    def trust_summary(cls, run_dir: Path, metrics: Mapping[str, Mapping[str, Any]]) -> list[TrustLine]:
        """One line per trust axis the task measures, for the top of the report."""

    def fix_xai_target(self, images: torch.Tensor, spec: Mapping[str, Any], masks: torch.Tensor | None,
                       labels: torch.Tensor | None) -> torch.Tensor | None:
        """What the explained scalar is fixed to on the unperturbed images (a region, a class, ...)."""

    def explain_target(self, output: torch.Tensor, fixed: torch.Tensor | None, kind: str) -> torch.Tensor:
        """The scalar per image (B) that XAI methods explain, from the forward output."""

    def explain_outcome(self, images: torch.Tensor, fixed: torch.Tensor | None, masks: torch.Tensor | None,
                        labels: torch.Tensor | None, evaluation: Any = None) -> dict[str, Any] | None:
        """Per-image ``uncertainty`` and ``correct`` arrays (stability vs uncertainty), or None."""

    def explain_images(self, datamodule: Any, split: str, n: int, seed: int = 0,
                       evaluation: Any = None) -> dict[str, Any] | None:
        """The images explain.py explains when they are not the split's own (None: the split's first
        ``n`` images): ``{"images" (B×C×H×W, normalised), "masks" (B×1×H×W or None), "labels" (or None),
        "raw" (B images H×W×C in [0, 1]), "ids"}`` — e.g. an anomaly detector's injected artifacts with
        their masks."""

    def explain_view(self, images: torch.Tensor, labels: torch.Tensor | None) -> dict[str, Any]:
        """What the explanation grid shows: ``pred`` (B×H×W), ``captions`` (list or None) and
        ``pixel_prob`` (B×H×W per-pixel probabilities, or None when the task has none)."""

    @classmethod
    def compare(cls, runs: Sequence[RunModel], datamodule: Any, split: str, out_dir: Path,
                evaluation: Any = None, n_show: int = 6) -> list[dict[str, Any]]:
        """Score several runs on the same images: one row per run (figures into ``out_dir``)."""


def check_task(task: Any) -> None:
    """Raise a TypeError naming what ``task`` lacks of the :class:`Task` contract."""
    names = [n for n in ("task_name", "metric_group", "evaluation_config", "xai_target_kinds",
                         "has_pixel_probabilities", "check_data", "post_fit",
                         "load_post_fit", "evaluate_split", "report_sections", "trust_summary", "fix_xai_target",
                         "explain_target", "explain_outcome", "explain_images", "explain_view", "compare")
             if not hasattr(task, n)]
    if names:
        raise TypeError(f"{type(task).__name__} does not implement the task contract (medtrust.tasks.base.Task): "
                        f"missing {names}")


# -- shared implementation -----------------------------------------------------------------------
def load_init_weights(module: nn.Module, path: str | Path, key: str = "model.init_from",
                      state: Mapping[str, torch.Tensor] | None = None) -> dict[str, list[str]]:
    """Initialise ``module`` from a checkpoint's weights (``weights_only=True``), non-strictly.

    Tensors whose name and shape match are copied; the rest are reported (and logged) so a user
    can see exactly what was not transferred.

    Args:
        module: the task (its ``state_dict`` keys are compared with the checkpoint's).
        path: a Lightning ``.ckpt`` (uses its ``state_dict``) or a plain state-dict file.
        key: config key named in error messages.
        state: the checkpoint's state dict when the caller has already read (and remapped) it;
            ``path`` is then only named in messages.

    Returns:
        ``{"loaded", "missing", "unexpected", "shape_mismatch"}`` lists of parameter names.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not a checkpoint, or no parameter matched.
    """
    p = Path(str(path)).expanduser()
    if state is not None:
        ckpt: Any = {"state_dict": dict(state)}
    elif not p.is_file():
        raise FileNotFoundError(f"{key}: checkpoint not found: {p}")
    else:
        try:
            ckpt = load_tensors(p, "checkpoint")
        except ValueError as err:
            raise ValueError(f"{key}: {err}") from None
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
    if "pct_start" in params and "total_steps" in extra:
        # OneCycleLR divides by (pct_start * total_steps - 1): a run too short for ~1.5 warm-up steps (e.g.
        # pct_start 0.05 of 20 steps) would stop with ZeroDivisionError; give it 1.5 warm-up steps instead
        pct = float(given.get("pct_start", params["pct_start"].default))
        if pct * horizon - 1 < 0.5:
            extra["pct_start"] = min(1.5 / horizon, 0.5 if horizon == 1 else 0.75)
            log.warning(f"OneCycleLR: pct_start={pct} of {horizon} steps is under 1.5 warm-up steps; "
                        f"using pct_start={extra['pct_start']:.3f} for this short run")
    return factory(optimizer, **extra)


class TaskBase(L.LightningModule):
    """Shared implementation of the :class:`Task` contract for tasks built from Hydra partials.

    Subclasses set the class attributes of the contract and ``self.optimizer_factory``,
    ``self.scheduler_factory``, ``self.scheduler_interval`` and ``self.monitor``, and implement
    ``evaluate_split``, ``fix_xai_target``, ``explain_target``, ``explain_view`` and ``compare``.
    The defaults here: nothing to fit after training, no task-specific report section, no trust
    lines beyond the generic ones, no outcome for stability-vs-uncertainty, no ensembles.
    """

    task_name: ClassVar[str] = "task"
    metric_group: ClassVar[str] = "task"
    evaluation_config: ClassVar[str] = "default"
    xai_target_kinds: ClassVar[tuple[str, ...]] = ()
    has_pixel_probabilities: ClassVar[bool] = False
    # constructor arguments when a trained run is rebuilt from its checkpoint (all weights come from it)
    rebuild_overrides: ClassVar[dict[str, Any]] = {"init_from": None}

    optimizer_factory: Callable[..., torch.optim.Optimizer]
    scheduler_factory: Callable[..., Any] | None = None
    scheduler_interval: str = "step"
    monitor: str = "val/loss"

    # -- contract defaults -------------------------------------------------------------------
    def check_data(self, datamodule: Any, evaluation: Any = None) -> None:
        return None

    def post_fit(self, datamodule: Any, run_dir: Path, evaluation: Any = None) -> dict[str, Any] | None:
        return None

    @classmethod
    def load_post_fit(cls, run_dir: Path) -> dict[str, Any] | None:
        return None

    @classmethod
    def report_sections(cls, run_dir: Path, metrics: Mapping[str, Mapping[str, Any]]) -> list[ReportSection]:
        return []

    @classmethod
    def trust_summary(cls, run_dir: Path, metrics: Mapping[str, Mapping[str, Any]]) -> list[TrustLine]:
        return []

    def explain_outcome(self, images: torch.Tensor, fixed: torch.Tensor | None, masks: torch.Tensor | None,
                        labels: torch.Tensor | None, evaluation: Any = None) -> dict[str, Any] | None:
        return None

    def explain_images(self, datamodule: Any, split: str, n: int, seed: int = 0,
                       evaluation: Any = None) -> dict[str, Any] | None:
        return None

    @classmethod
    def ensemble_of(cls, tasks: Sequence[Any]) -> Any:
        """One task whose predictions are the ensemble of ``tasks`` (``evaluate.py ensemble_runs=[...]``).

        Raises:
            ValueError: the task does not support ensembles (the default).
        """
        raise ValueError(f"ensemble_runs: {cls.task_name} runs cannot be ensembled")

    def score_ood(self, datamodule: Any, split: str, sets: Sequence[str], out_dir: Path, evaluation: Any = None,
                  fitted: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Score ``split`` (in distribution) against each out-of-distribution image set
        (``evaluate.py ood.sets=[...]``): ``metrics/ood.json`` and its tables and figures.

        Raises:
            ValueError: the task has no out-of-distribution detectors (the default).
        """
        raise ValueError(f"ood.sets: {self.task_name} runs have no out-of-distribution detectors "
                         "(classifier runs do)")

    def evaluate_shift(self, datamodule: Any, split: str, out_dir: Path, evaluation: Any = None,
                       fitted: Mapping[str, Any] | None = None, spec: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Score ``split`` under shift (``spec``: the ``shift`` config: a corruption benchmark, prevalences).

        Raises:
            ValueError: the task has no shift benchmark (the default).
        """
        raise ValueError(f"shift: {self.task_name} runs have no shift benchmark (classifier runs do)")

    def evaluate_split(self, datamodule: Any, split: str, out_dir: Path, evaluation: Any = None,
                       extra: Mapping[str, Any] | None = None,
                       fitted: Mapping[str, Any] | None = None) -> EvalResult:
        raise NotImplementedError(f"{type(self).__name__}.evaluate_split")

    def fix_xai_target(self, images: torch.Tensor, spec: Mapping[str, Any], masks: torch.Tensor | None,
                       labels: torch.Tensor | None) -> torch.Tensor | None:
        raise NotImplementedError(f"{type(self).__name__}.fix_xai_target")

    def explain_target(self, output: torch.Tensor, fixed: torch.Tensor | None, kind: str) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__}.explain_target")

    def explain_view(self, images: torch.Tensor, labels: torch.Tensor | None) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__}.explain_view")

    @classmethod
    def compare(cls, runs: Sequence[RunModel], datamodule: Any, split: str, out_dir: Path,
                evaluation: Any = None, n_show: int = 6) -> list[dict[str, Any]]:
        raise NotImplementedError(f"{cls.__name__}.compare")

    # -- optimisation ----------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        opt = self.optimizer_factory(params=[p for p in self.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return opt
        trainer = self.trainer
        sched = build_scheduler(self.scheduler_factory, opt, int(trainer.estimated_stepping_batches),
                                int(trainer.max_epochs or 1), self.scheduler_interval)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": self.scheduler_interval,
                                                   "monitor": self.monitor}}
