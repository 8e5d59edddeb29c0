"""Localisation of a heatmap against a ground-truth mask (pure functions on H×W arrays).

Convention: a result is *undefined* when the heatmap is all-zero or has a non-finite value, or the
mask is empty; it is then NaN, counted by the caller and never averaged in. The mask is binarised
at ``> 0.5``.

Top-k binarisation (:func:`topk_mask`) keeps exactly ``max(1, floor(k * H * W + 0.5))`` pixels
(``k * H * W`` rounded half up); ties are broken by a stable descending sort, i.e. the pixel that
comes first in row-major order wins. The same helper is used by :mod:`medtrust.metrics.stability`.
"""
from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import roc_auc_score


def _check(heatmap: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    h = np.asarray(heatmap, dtype=float)
    m = np.asarray(mask) > 0.5
    if h.shape != m.shape:
        raise ValueError(f"heatmap shape {h.shape} != mask shape {m.shape}")
    if not np.isfinite(h).all() or np.abs(h).max() == 0 or not m.any():
        return None  # undefined: counted by the caller, never averaged in
    return h, m


def pointing_game(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """1.0 if the heatmap's maximum lies inside the mask, else 0.0 (NaN if undefined)."""
    c = _check(heatmap, mask)
    if c is None:
        return float("nan")
    h, m = c
    return float(m.flat[int(np.argmax(h))])


def relevance_mass(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """Share of positive relevance that falls inside the mask (NaN if undefined)."""
    c = _check(heatmap, mask)
    if c is None:
        return float("nan")
    h, m = c
    pos = np.clip(h, 0, None)
    total = pos.sum()
    return float(pos[m].sum() / total) if total > 0 else float("nan")


def check_k(k: float) -> float:
    """Validate a top-k fraction.

    Args:
        k: fraction of pixels, in ``(0, 1]``.

    Returns:
        ``k`` as a float.

    Raises:
        ValueError: ``k`` is not a finite number in ``(0, 1]``.
    """
    if isinstance(k, bool) or not isinstance(k, (int, float, np.integer, np.floating)) or not 0 < k <= 1:
        raise ValueError(f"k must be a fraction in (0, 1], got {k!r}")
    return float(k)


def topk_count(n_pixels: int, k: float) -> int:
    """Number of pixels kept by a top-k fraction: ``k * n_pixels`` rounded half up, at least 1."""
    return max(1, min(n_pixels, math.floor(check_k(k) * n_pixels + 0.5)))


def topk_mask(heatmap: np.ndarray, k: float = 0.1) -> np.ndarray:
    """Boolean mask of the top-k fraction of pixels of ``heatmap`` (no undefinedness check).

    Args:
        heatmap: map of any shape (usually H×W), finite values.
        k: fraction of pixels to keep, in ``(0, 1]``; exactly :func:`topk_count` pixels are set.

    Returns:
        Boolean array of ``heatmap``'s shape. Ties are broken by a stable descending sort (the
        earlier pixel in row-major order is kept).

    Raises:
        ValueError: ``k`` out of range.
    """
    h = np.asarray(heatmap, dtype=float)
    n = topk_count(h.size, k)
    order = np.argsort(-h.ravel(), kind="stable")
    out = np.zeros(h.size, dtype=bool)
    out[order[:n]] = True
    return out.reshape(h.shape)


def topk_overlap(heatmap: np.ndarray, mask: np.ndarray, k: float = 0.1) -> dict[str, float]:
    """Overlap of the heatmap's top-k pixels with the mask (binarised-heatmap IoU and Dice).

    The "top-k% pixels" localisation protocol (e.g. Saporta et al., Nat. Mach. Intell. 2022,
    binarising saliency maps before computing IoU with expert segmentations).

    Args:
        heatmap: H×W map; larger = more relevant (signed values are ranked as they are).
        mask: H×W ground truth, binarised at ``> 0.5``.
        k: fraction of pixels of the heatmap to keep, in ``(0, 1]`` (see :func:`topk_mask`).

    Returns:
        ``{"iou": |T∩M| / |T∪M|, "dice": 2|T∩M| / (|T| + |M|)}`` for the top-k set ``T`` and mask
        ``M``; both NaN if undefined (all-zero or non-finite heatmap, empty mask).

    Raises:
        ValueError: shape mismatch, or ``k`` not in ``(0, 1]``.
    """
    check_k(k)
    c = _check(heatmap, mask)
    if c is None:
        return {"iou": float("nan"), "dice": float("nan")}
    h, m = c
    t = topk_mask(h, k)
    inter = float(np.logical_and(t, m).sum())
    union = float(np.logical_or(t, m).sum())
    return {"iou": inter / union, "dice": 2 * inter / float(t.sum() + m.sum())}


def heatmap_auroc(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """AUROC of the heatmap values as scores for "pixel is inside the mask".

    Threshold-free localisation: the probability that a random mask pixel has a higher heatmap
    value than a random background pixel (ties count one half), via sklearn ``roc_auc_score``.

    Args:
        heatmap: H×W map; larger = more relevant.
        mask: H×W ground truth, binarised at ``> 0.5``.

    Returns:
        AUROC in ``[0, 1]`` (0.5 = chance); NaN if undefined (all-zero or non-finite heatmap,
        empty mask) or the mask covers every pixel (no background).

    Raises:
        ValueError: shape mismatch.
    """
    c = _check(heatmap, mask)
    if c is None:
        return float("nan")
    h, m = c
    if m.all():
        return float("nan")
    return float(roc_auc_score(m.ravel(), h.ravel()))


def localisation_metrics(heatmap: np.ndarray, mask: np.ndarray, k: float = 0.1) -> dict[str, float]:
    """All localisation metrics of one heatmap against one mask.

    Args:
        heatmap: H×W map.
        mask: H×W ground truth, binarised at ``> 0.5``.
        k: top-k fraction for :func:`topk_overlap`, in ``(0, 1]``.

    Returns:
        ``pointing_game``, ``relevance_mass``, ``topk_iou``, ``topk_dice``, ``heatmap_auroc``
        (each NaN where undefined, see the functions of the same names).

    Raises:
        ValueError: shape mismatch, or ``k`` not in ``(0, 1]``.
    """
    ov = topk_overlap(heatmap, mask, k)
    return {
        "pointing_game": pointing_game(heatmap, mask),
        "relevance_mass": relevance_mass(heatmap, mask),
        "topk_iou": ov["iou"],
        "topk_dice": ov["dice"],
        "heatmap_auroc": heatmap_auroc(heatmap, mask),
    }
