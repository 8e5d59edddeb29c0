"""Split-conformal guarantees: prediction sets for classifiers (LAC, APS, RAPS) and conformal risk
control of the pixel false-negative rate for segmenters.

Classification (Sadinle et al. 2019 "LAC"; Romano et al. 2020 "APS"; Angelopoulos et al. 2021
"RAPS"): a score s(x, y) is computed on n labelled calibration images, its
``ceil((n + 1)(1 - alpha)) / n`` empirical quantile q is taken, and a test image's set holds every
class whose score is <= q. On exchangeable data the set contains the true class with probability
>= 1 - alpha (and, with the randomised APS / RAPS scores, < 1 - alpha + 1 / (n + 1)).

Written here rather than through MAPIE or TorchCP: MAPIE 1.6 refuses APS and RAPS for two classes
(``Invalid conformity score for binary target``), which is this project's main case, and TorchCP
needs ``torchsort``, a C++ extension compiled against torch at install. The LAC sets are checked
to equal MAPIE's, and APS / RAPS coverage against MAPIE's on three classes, in
``tests/test_conformal.py``.

Segmentation (Angelopoulos et al. 2024, "Conformal Risk Control"): for a loss L_i(lambda) that is
non-increasing in lambda and bounded by B = 1, the smallest lambda with
``n / (n + 1) * mean_i L_i(lambda) + 1 / (n + 1) <= alpha`` gives E[L_test] <= alpha. Here
lambda = 1 - t for the pixel threshold t and L_i is image i's false-negative rate.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

METHODS = ("lac", "aps", "raps")


def check_alpha(alpha: Any, key: str = "alpha") -> float:
    """``alpha`` as a float in (0, 1).

    Raises:
        ValueError: naming ``key``, for anything else (0, 1, negative, not a number).
    """
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a number in (0, 1), got {alpha!r}") from None
    if not 0.0 < a < 1.0 or math.isnan(a):
        raise ValueError(f"{key} must lie in (0, 1) (the allowed miscoverage / risk), got {alpha!r}")
    return a


def min_calibration_size(alpha: float) -> int:
    """Fewest calibration images with which the split-conformal quantile is finite: ceil(1/alpha) - 1."""
    return math.ceil(1.0 / alpha) - 1


def check_calibration_size(n: int, alpha: float, where: str) -> None:
    """Raises ValueError when ``n`` calibration images cannot give a finite quantile at ``alpha``."""
    need = min_calibration_size(alpha)
    if n < need:
        raise ValueError(f"{where}: {n} calibration image(s) are too few for alpha={alpha:g}: a split-conformal "
                         f"guarantee needs at least ceil(1/alpha) - 1 = {need} (use a larger alpha or calibration split)")


def _ranked(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image: class order by decreasing probability, the sorted probabilities and each class's rank."""
    order = np.argsort(-probs, axis=1, kind="stable")
    sorted_p = np.take_along_axis(probs, order, 1)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(probs.shape[1])[None].repeat(len(probs), 0), 1)
    return order, sorted_p, rank


def class_scores(probs: np.ndarray, method: str, u: np.ndarray | None = None, k_reg: int = 1,
                 lam: float = 0.01) -> np.ndarray:
    """Conformity score of every class of every image (N×C; larger = less conforming).

    Args:
        probs: N×C probabilities.
        method: ``lac`` (1 - p_y), ``aps`` (mass of the classes ranked above y, plus u * p_y) or
            ``raps`` (APS + lam * max(0, rank(y) + 1 - k_reg)).
        u: N uniforms of the randomised APS / RAPS scores (None: u = 1, the conservative version).
    """
    if method not in METHODS:
        raise ValueError(f"conformal method must be one of {METHODS}, got {method!r}")
    p = np.asarray(probs, dtype=np.float64)
    if method == "lac":
        return 1.0 - p
    _, sorted_p, rank = _ranked(p)
    above = np.cumsum(sorted_p, 1) - sorted_p                       # mass strictly above each rank
    u = np.ones(len(p)) if u is None else np.asarray(u, dtype=np.float64)
    s = np.take_along_axis(above, rank, 1) + u[:, None] * p
    if method == "raps":
        s = s + lam * np.maximum(0, rank + 1 - int(k_reg))
    return s


def conformal_quantile(scores: np.ndarray, alpha: float) -> float:
    """The k-th smallest of n calibration scores, k = ceil((n + 1)(1 - alpha)) (not ``np.quantile`` at
    k / n: its (n - 1)-based positions pick the (k + 1)-th, one image too conservative)."""
    n = len(scores)
    check_calibration_size(n, alpha, "conformal calibration")
    k = min(n, math.ceil((n + 1) * (1 - alpha)))
    return float(np.sort(np.asarray(scores, dtype=np.float64))[k - 1])


def fit_sets(probs: np.ndarray, labels: np.ndarray, alpha: float, method: str, seed: int = 0, k_reg: int = 1,
             lam: float = 0.01) -> float:
    """The threshold q of ``method`` fitted on calibration probabilities and labels."""
    rng = np.random.default_rng(seed)
    u = rng.uniform(size=len(probs)) if method != "lac" else None
    s = class_scores(probs, method, u, k_reg, lam)
    return conformal_quantile(s[np.arange(len(labels)), np.asarray(labels, dtype=int)], alpha)


def predict_sets(probs: np.ndarray, q: float, method: str, seed: int = 1, k_reg: int = 1,
                 lam: float = 0.01) -> np.ndarray:
    """N×C boolean prediction sets: every class whose score is <= q (randomised for APS / RAPS)."""
    rng = np.random.default_rng(seed)
    u = rng.uniform(size=len(probs)) if method != "lac" else None
    return class_scores(probs, method, u, k_reg, lam) <= q + 1e-12


def set_summary(sets: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Empirical coverage, mean size, share of empty and of singleton sets, coverage per true class."""
    labels = np.asarray(labels, dtype=int)
    hit = sets[np.arange(len(labels)), labels]
    size = sets.sum(1)
    return {"coverage": float(hit.mean()), "mean_size": float(size.mean()), "empty": float((size == 0).mean()),
            "singleton": float((size == 1).mean()), "n": int(len(labels)),
            "coverage_by_class": {int(k): float(hit[labels == k].mean()) for k in np.unique(labels)}}


def set_strings(sets: np.ndarray) -> list[str]:
    """Sets as ``"0|1"`` strings (``""`` for an empty set), for CSV columns."""
    return ["|".join(str(int(k)) for k in np.flatnonzero(row)) for row in sets]


# -- segmentation: conformal risk control of the false-negative rate ---------------------------
def _sorted_lesion_probs(probs: torch.Tensor, masks: torch.Tensor) -> list[np.ndarray]:
    """Per image: the sorted probabilities of its ground-truth pixels (empty array: no lesion)."""
    out = []
    for p, m in zip(probs.flatten(1), masks.flatten(1)):
        out.append(np.sort(p[m > 0.5].double().numpy()))
    return out


def fnr_curve(probs: torch.Tensor, masks: torch.Tensor, thresholds: Sequence[float]) -> np.ndarray:
    """N_lesion × T false-negative rates (pixels with p < t missed) of the images with a lesion."""
    t = np.asarray(thresholds, dtype=np.float64)
    rows = [np.searchsorted(v, t, side="left") / len(v) for v in _sorted_lesion_probs(probs, masks) if len(v)]
    return np.stack(rows) if rows else np.zeros((0, len(t)))


def crc_from_curve(curve: np.ndarray, thresholds: Sequence[float], alpha: float, n_no_lesion: int = 0) -> dict[str, Any]:
    """The largest threshold whose conformal risk bound ``n/(n+1) * mean FNR + 1/(n+1)`` is <= alpha, from
    the calibration images' FNR curves (N_lesion × T, non-decreasing in the threshold).

    Raises:
        ValueError: fewer lesion images than ceil(1/alpha) - 1 (no threshold can give the bound).
    """
    ts = np.asarray(thresholds, dtype=np.float64)
    n = len(curve)
    check_calibration_size(n, alpha, "conformal risk control (images with a lesion)")
    bound = n / (n + 1) * curve.mean(0) + 1 / (n + 1)           # non-decreasing in t
    ok = np.flatnonzero(bound <= alpha)
    i = int(ok[-1]) if len(ok) else 0
    return {"alpha": alpha, "threshold": float(ts[i]) if len(ok) else 0.0, "n_lesion": n,
            "n_no_lesion": int(n_no_lesion), "fnr_on_fitted": float(curve[:, i].mean()) if len(ok) else 0.0,
            "bound_on_fitted": float(bound[i])}


def crc_fnr_threshold(probs: torch.Tensor, masks: torch.Tensor, alpha: float, grid: int = 2001) -> dict[str, Any]:
    """The largest pixel threshold t whose conformal risk bound on the image-mean FNR is <= alpha
    (images without a lesion have no FNR and are left out, counted in ``n_no_lesion``)."""
    ts = np.linspace(0.0, 1.0, grid)
    curve = fnr_curve(probs, masks, ts)
    return crc_from_curve(curve, ts, alpha, len(probs) - len(curve))
