"""Scalar targets that XAI methods differentiate or score. One interface for every method and task:
a callable ``Target(images) -> B`` whose kind, and what it is fixed to, come from the task.

The task declares its kinds (``task.xai_target_kinds``: e.g. ``region_logit`` / ``region_prob`` for
a segmenter, ``class_logit`` / ``class_prob`` for a classifier, an anomaly score later), fixes the
target on the unperturbed images (``task.fix_xai_target``: the predicted region, the predicted
class, ...) and computes the scalar (``task.explain_target``). Nothing here knows a task by name.

The region / class is fixed once, so every perturbed input (IG path points, occlusions, Score-CAM
masks, MC-dropout passes) is scored on the same pixels or class.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def _repeat_to(t: torch.Tensor, n: int) -> torch.Tensor:
    """Repeat ``t`` (B×...) along the batch to ``n`` rows (captum batches path points / masks as
    whole copies of the input batch)."""
    if t.shape[0] == n:
        return t
    if n % t.shape[0]:
        raise ValueError(f"cannot match a batch of {n} inputs to {t.shape[0]} fixed targets")
    return t.repeat(n // t.shape[0], *([1] * (t.dim() - 1)))


class Target:
    """Scalar target ``f(x[, fixed]) -> B`` with what it is fixed to (region, class, ...) per image.

    Called as ``f(x)`` the fixed value is tiled to ``x``'s batch (captum's IG, occlusion and our
    Score-CAM evaluate whole copies of the batch); captum methods that expand inputs in another
    order (GradientShap: ``repeat_interleave``) get ``fixed`` through ``additional_forward_args``,
    which captum expands the same way as the inputs: pass ``target.captum_args``.
    """

    def __init__(self, task: torch.nn.Module, kind: str, fixed: torch.Tensor | None) -> None:
        self.task, self.kind, self.fixed = task, kind, fixed

    @property
    def captum_args(self) -> tuple[torch.Tensor, ...] | None:
        return None if self.fixed is None else (self.fixed,)

    def __call__(self, x: torch.Tensor, fixed: torch.Tensor | None = None) -> torch.Tensor:
        if fixed is None and self.fixed is not None:
            fixed = _repeat_to(self.fixed.to(x.device), x.shape[0])
        return self.task.explain_target(self.task(x), fixed, self.kind)

    def with_kind(self, kind: str) -> Target:
        """Same fixed value, another kind of the same task (e.g. logit -> probability)."""
        return Target(self.task, kind, self.fixed)


def target_kinds(task: torch.nn.Module) -> tuple[str, ...]:
    """Target kinds the task declares (``task.xai_target_kinds``)."""
    return tuple(getattr(task, "xai_target_kinds", ()) or ())


def check_kind(task: torch.nn.Module, kind: str) -> None:
    """Raise a ValueError naming the task and its kinds when ``kind`` is not one of them."""
    if kind not in target_kinds(task):
        task_name = getattr(task, "task_name", type(task).__name__)
        raise ValueError(f"xai.target.kind={kind!r} does not apply to a {task_name} task; "
                         f"choose from {target_kinds(task)}")


def fix_target(task: torch.nn.Module, images: torch.Tensor, spec: Mapping[str, Any],
               masks: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor | None:
    """What the target of ``spec["kind"]`` is fixed to on ``images`` (``task.fix_xai_target``).

    Raises:
        ValueError: a kind the task does not declare (named with the task's kinds), or what the
            task itself refuses (e.g. ``region: mask`` without masks).
    """
    check_kind(task, str(spec["kind"]))
    return task.fix_xai_target(images, spec, masks, labels)


def make_target(task: torch.nn.Module, kind: str, fixed: torch.Tensor | None) -> Target:
    """The scalar target of ``kind`` with its fixed value (from :func:`fix_target`)."""
    check_kind(task, kind)
    return Target(task, kind, fixed)


def as_probability(kind: str, task: torch.nn.Module | None = None) -> str:
    """The probability variant of a target kind (``*_logit`` -> ``*_prob``) when the task declares
    it; otherwise the kind itself (a task whose target is already a probability or a score)."""
    prob = kind.replace("_logit", "_prob")
    if task is not None and prob not in target_kinds(task):
        return kind
    return prob
