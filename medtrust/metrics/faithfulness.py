"""Faithfulness of explanations: the deletion / insertion game.

Petsiuk, Das & Saenko, "RISE: Randomized Input Sampling for Explanation of Black-box Models",
BMVC 2018. Pixels are ranked by the heatmap (most relevant first). *Deletion* replaces the top
fraction ``f`` of pixels with a baseline and watches the model score fall; *insertion* starts from
the baseline and reveals the top fraction ``f`` of the image. A faithful map makes the score fall
fast (low deletion AUC) and rise fast (high insertion AUC).

Convention: a heatmap that is all-zero or has a non-finite value gives no ranking, so that image's
curves and AUCs are NaN (counted by the caller, never averaged in), as in
:mod:`medtrust.metrics.localisation`.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch


def deletion_insertion(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                       heatmaps: np.ndarray | torch.Tensor, baseline: torch.Tensor | None = None,
                       n_steps: int = 20, batch_size: int = 64, normalise: bool = True) -> dict[str, np.ndarray]:
    """Deletion and insertion curves and their areas for a batch of images.

    For ``f`` in ``linspace(0, 1, n_steps + 1)`` the top ``floor(f * H * W + 0.5)`` pixels (all
    channels of a pixel together) are taken from the baseline (deletion) or from the image
    (insertion, the rest from the baseline). Pixels are ranked by descending heatmap value with a
    stable sort (ties: earlier pixel in row-major order first). All perturbed images of all steps
    are pushed through ``forward`` in chunks of ``batch_size`` under ``torch.no_grad()``; they are
    built chunk by chunk, so memory is O(``batch_size``) images.

    Args:
        forward: maps B×C×H×W images to B scores (a class probability, or a segmentation target
            such as the sum of sigmoid outputs over a fixed region). Put the model in eval mode.
        images: B×C×H×W tensor (model input space, i.e. already normalised).
        heatmaps: B×H×W maps, numpy or torch; larger = more relevant.
        baseline: B×C×H×W "removed" image; default zeros (the dataset mean for normalised inputs).
        n_steps: number of steps; curves have ``n_steps + 1`` points, ``f = 0`` included.
        batch_size: images per ``forward`` call.
        normalise: divide each image's two curves by its unperturbed score (the deletion curve at
            ``f = 0``), so that AUCs are comparable across images — for a segmentation target the
            raw scale is arbitrary. Assumes non-negative scores; an image whose unperturbed score
            is ``<= 0`` or non-finite gets NaN curves and AUCs. With ``normalise=False`` the raw
            scores are returned.

    Returns:
        ``deletion_auc`` (B,), ``insertion_auc`` (B,): trapezoid-rule areas over ``f ∈ [0, 1]``;
        ``deletion_curve``, ``insertion_curve`` (B × (n_steps+1)); ``fractions`` (n_steps+1,);
        ``score`` (B,): the raw unperturbed score. All float64 numpy arrays.

    Raises:
        ValueError: bad shapes, ``n_steps < 1``, ``batch_size < 1``, or ``forward`` not
            returning one score per image.
    """
    if not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be an int >= 1, got {n_steps!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if images.ndim != 4:
        raise ValueError(f"images must be B×C×H×W, got shape {tuple(images.shape)}")
    b, _, h, w = images.shape
    heat = torch.as_tensor(np.asarray(heatmaps) if not torch.is_tensor(heatmaps) else heatmaps.detach())
    heat = heat.to(device=images.device, dtype=torch.float64)
    if tuple(heat.shape) != (b, h, w):
        raise ValueError(f"heatmaps must be B×H×W = {(b, h, w)}, got shape {tuple(heat.shape)}")
    if baseline is None:
        baseline = torch.zeros_like(images)
    elif baseline.shape != images.shape:
        raise ValueError(f"baseline shape {tuple(baseline.shape)} != images shape {tuple(images.shape)}")
    baseline = baseline.to(images)

    flat = heat.reshape(b, -1)
    defined = (torch.isfinite(flat).all(1) & (flat != 0).any(1)).cpu().numpy()
    order = torch.argsort(-torch.nan_to_num(flat), dim=1, stable=True)
    rank = torch.empty_like(order)  # rank[b, pixel] = position of pixel in the ranking
    rank.scatter_(1, order, torch.arange(h * w, device=order.device).expand(b, -1).contiguous())
    fractions = np.linspace(0.0, 1.0, n_steps + 1)
    n_keep = torch.tensor([math.floor(f * h * w + 0.5) for f in fractions], device=images.device)

    # job j: mode = j // (B*(S+1)) (0 deletion, 1 insertion), image = (j // (S+1)) % B, step = j % (S+1)
    n_jobs = 2 * b * (n_steps + 1)
    scores = torch.empty(n_jobs, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, n_jobs, batch_size):
            j = torch.arange(start, min(start + batch_size, n_jobs), device=images.device)
            mode, img, step = j // (b * (n_steps + 1)), (j // (n_steps + 1)) % b, j % (n_steps + 1)
            top = rank[img] < n_keep[step][:, None]  # chunk × HW: pixel is among the top fraction
            from_base = torch.where(mode[:, None] == 0, top, ~top).reshape(-1, 1, h, w)
            x = torch.where(from_base, baseline[img], images[img])
            out = forward(x).reshape(-1)
            if out.numel() != len(j):
                raise ValueError(f"forward must return one score per image: {len(j)} images gave "
                                 f"output of {out.numel()} values")
            scores[start:start + len(j)] = out.detach().to("cpu", torch.float64)
    curves = scores.numpy().reshape(2, b, n_steps + 1)
    deletion, insertion = curves[0].copy(), curves[1].copy()
    score = deletion[:, 0].copy()
    if normalise:
        ok = np.isfinite(score) & (score > 0)
        denom = np.where(ok, score, 1.0)[:, None]
        deletion, insertion = deletion / denom, insertion / denom
        defined = defined & ok
    deletion[~defined] = np.nan
    insertion[~defined] = np.nan
    return {
        "deletion_auc": np.trapezoid(deletion, fractions, axis=1),
        "insertion_auc": np.trapezoid(insertion, fractions, axis=1),
        "deletion_curve": deletion,
        "insertion_curve": insertion,
        "fractions": fractions,
        "score": score,
    }
