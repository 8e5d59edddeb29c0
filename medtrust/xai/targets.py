"""Scalar targets that XAI methods differentiate or score. One interface for every method and task:
a callable ``forward(images) -> B`` built from a task by :func:`build_target`.

Kinds (``xai.target``):
    segmentation: ``region_logit`` (sum of logits over a region: the sensitivity GlassBox shows) and
        ``region_prob`` (sum of sigmoid: the decision); the region is the prediction on the
        *unperturbed* image (``region: pred``) or the ground-truth mask (``region: mask``).
    classification: ``class_logit`` and ``class_prob`` (softmax) of a class fixed on the
        unperturbed image (``class: pred``), the label (``class: label``) or a given index.
    Later tasks add their own kinds (e.g. the anomaly score) through ``task.xai_target_kinds``.

The region / class is fixed once, so every perturbed input (IG path points, occlusions, Score-CAM
masks, MC-dropout passes) is scored on the same pixels or class.
"""
from __future__ import annotations

from typing import Any

import torch

TARGET_KINDS = {"segmentation": ("region_logit", "region_prob"), "classification": ("class_logit", "class_prob")}


def _repeat_to(t: torch.Tensor, n: int) -> torch.Tensor:
    """Repeat ``t`` (B×...) along the batch to ``n`` rows (captum batches path points / masks as
    whole copies of the input batch)."""
    if t.shape[0] == n:
        return t
    if n % t.shape[0]:
        raise ValueError(f"cannot match a batch of {n} inputs to {t.shape[0]} fixed targets")
    return t.repeat(n // t.shape[0], *([1] * (t.dim() - 1)))


class Target:
    """Scalar target ``f(x[, fixed]) -> B`` with its region / class fixed per image.

    Called as ``f(x)`` the fixed region/class is tiled to ``x``'s batch (captum's IG, occlusion and
    our Score-CAM evaluate whole copies of the batch); captum methods that expand inputs in another
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
        out = self.task(x)
        if self.kind in ("region_logit", "region_prob"):
            return self.task.explain_target(out, fixed, use_sigmoid=self.kind == "region_prob")
        if self.kind == "class_prob":
            out = torch.softmax(out, -1)
        return self.task.explain_target(out, fixed)

    def with_kind(self, kind: str) -> Target:
        """Same fixed region/class, another kind of the same family (logit <-> probability)."""
        return Target(self.task, kind, self.fixed)


def segmentation_target(task: torch.nn.Module, region: torch.Tensor | None = None,
                        use_sigmoid: bool = True) -> Target:
    """Segmentation target: the sum of sigmoid (``use_sigmoid``) or logits over ``region``
    (B×1×H×W; ``None``: each input's own prediction)."""
    return Target(task, "region_prob" if use_sigmoid else "region_logit", region)


def classification_target(task: torch.nn.Module, target_class: torch.Tensor, probability: bool = False) -> Target:
    """Classification target: the logit (or softmax probability) of a fixed class per image
    (``target_class``: B integers)."""
    return Target(task, "class_prob" if probability else "class_logit", target_class.long())


@torch.no_grad()
def predicted_region(task: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The task's predicted mask (B×1×H×W float) for ``images``; an empty prediction falls back to
    the whole image so the target is never identically zero."""
    mask = task.predict_step({"image": images})["mask_pred"].float()
    empty = mask.flatten(1).sum(1) == 0
    mask[empty] = 1.0
    return mask


def target_kinds(task: torch.nn.Module) -> tuple[str, ...]:
    """Target kinds a task supports (``task.xai_target_kinds`` or by ``task_name``)."""
    kinds = getattr(task, "xai_target_kinds", None)
    return tuple(kinds) if kinds else TARGET_KINDS.get(getattr(task, "task_name", ""), ())


def fix_target(task: torch.nn.Module, images: torch.Tensor, spec: Any, masks: torch.Tensor | None = None,
               labels: torch.Tensor | None = None) -> torch.Tensor:
    """What the target is fixed to for ``images``: the region (B×1×H×W) or the class (B).

    ``spec``: ``{"kind", "region": pred|mask}`` (segmentation) or ``{"kind", "class": pred|label|<int>}``.

    Raises:
        ValueError: a kind the task does not support (named), or ``mask``/``label`` asked for but
            not available.
    """
    kind = str(spec["kind"])
    task_name = getattr(task, "task_name", type(task).__name__)
    if kind not in target_kinds(task):
        raise ValueError(f"xai.target.kind={kind!r} does not apply to a {task_name} task; "
                         f"choose from {target_kinds(task)}")
    if kind.startswith("region_"):
        where = str(spec.get("region", "pred"))
        if where == "mask":
            if masks is None:
                raise ValueError("xai.target.region=mask but the images have no ground-truth masks")
            return masks.float()
        if where != "pred":
            raise ValueError(f"xai.target.region must be pred or mask, got {where!r}")
        return predicted_region(task, images)
    which = spec.get("class", "pred")
    if which == "label":
        if labels is None:
            raise ValueError("xai.target.class=label but the images have no labels")
        return labels.long()
    if which == "pred":
        with torch.no_grad():
            return task(images).argmax(-1)
    n = int(getattr(task, "num_classes", 2))
    if not (isinstance(which, int) and 0 <= which < n):
        raise ValueError(f"xai.target.class must be pred, label or a class index in [0, {n}), got {which!r}")
    return torch.full((images.shape[0],), which, dtype=torch.long)


def make_target(task: torch.nn.Module, kind: str, fixed: torch.Tensor) -> Target:
    """The scalar target of ``kind`` with its region/class ``fixed`` (from :func:`fix_target`)."""
    if kind not in sum(TARGET_KINDS.values(), ()) and kind not in target_kinds(task):
        raise ValueError(f"unknown target kind {kind!r}; known: {sum(TARGET_KINDS.values(), ())}")
    return Target(task, kind, fixed)


def as_probability(kind: str) -> str:
    """The probability variant of a target kind (``*_logit`` -> ``*_prob``)."""
    return kind.replace("_logit", "_prob")
