"""Scalar targets that XAI methods differentiate. One interface for every method: a callable
``forward(images) -> B`` built from a task (GlassBox: sum of sigmoid or logits over a region)."""
from __future__ import annotations

from collections.abc import Callable

import torch


def segmentation_target(task: torch.nn.Module, region: torch.Tensor | None = None,
                        use_sigmoid: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """Forward function for a segmentation task.

    Args:
        task: a task with ``forward`` (logits) and ``explain_target``.
        region: fixed B×1×H×W region to sum over (default: the prediction of the *unperturbed*
            image, fixed here so every perturbed input is scored on the same pixels).
        use_sigmoid: sum probabilities (the decision) instead of raw logits (the sensitivity).

    Returns:
        ``f(x) -> B`` scores; inputs of a different batch size (captum's internal batching) are
        matched to ``region`` by repeating it.
    """
    def forward(x: torch.Tensor) -> torch.Tensor:
        logits = task(x)
        reg = region
        if reg is not None and reg.shape[0] != x.shape[0]:
            reg = reg.repeat(x.shape[0] // reg.shape[0], 1, 1, 1)
        return task.explain_target(logits, reg, use_sigmoid=use_sigmoid)

    return forward


@torch.no_grad()
def predicted_region(task: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The task's predicted mask (B×1×H×W float) for ``images``; an empty prediction falls back to
    the whole image so the target is never identically zero."""
    mask = task.predict_step({"image": images})["mask_pred"].float()
    empty = mask.flatten(1).sum(1) == 0
    mask[empty] = 1.0
    return mask
