"""Stability of explanations under perturbation (pure functions on H×W / T×H×W numpy maps).

An explanation of a trustworthy model should not change much when the input or the model is
perturbed in ways that do not change the prediction: MC-dropout passes, test-time augmentations
(with the augmentation inverted on the map), small input noise. Stability is measured pairwise
with three complementary views (cf. Alvarez-Melis & Jaakkola, "On the robustness of
interpretability methods", 2018; Adebayo et al., NeurIPS 2018, for rank correlation):

* ``topk_iou`` — do the two maps highlight the same top-k pixels?
* ``spearman`` — do they rank *all* pixels alike?
* ``com_shift_px`` — how far does the centre of (positive) relevance move, in pixels?

Convention (shared with :mod:`medtrust.metrics.localisation`): a map with a non-finite value or
all zeros is undefined; results involving it are NaN, counted by the caller, never averaged in.
Spearman is additionally NaN for a constant map (no ranking), and the centre of mass for a map
without positive values.
"""
from __future__ import annotations

from itertools import combinations

import numpy as np
from scipy import stats

from medtrust.metrics.localisation import check_k, topk_mask


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"map shapes differ: a {x.shape} != b {y.shape}")
    return x, y


def _undefined(x: np.ndarray) -> bool:
    return x.size == 0 or not np.isfinite(x).all() or not np.any(x)


def topk_agreement(a: np.ndarray, b: np.ndarray, k: float = 0.1) -> float:
    """IoU of the top-k pixel sets of two maps.

    Args:
        a: H×W map.
        b: H×W map.
        k: fraction of pixels kept per map, in ``(0, 1]`` (exactly ``max(1, round(k*H*W))``
            pixels, ties broken by row-major order, see
            :func:`medtrust.metrics.localisation.topk_mask`).

    Returns:
        ``|A∩B| / |A∪B|`` in ``[0, 1]``; NaN if either map is all-zero or non-finite.

    Raises:
        ValueError: shape mismatch, or ``k`` not in ``(0, 1]``.
    """
    check_k(k)
    x, y = _pair(a, b)
    if _undefined(x) or _undefined(y):
        return float("nan")
    ta, tb = topk_mask(x, k), topk_mask(y, k)
    return float(np.logical_and(ta, tb).sum() / np.logical_or(ta, tb).sum())


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of the two maps' pixel values (``scipy.stats.spearmanr``).

    Args:
        a: H×W map.
        b: H×W map.

    Returns:
        rho in ``[-1, 1]``; NaN if either map is non-finite, all-zero or constant.

    Raises:
        ValueError: shape mismatch.
    """
    x, y = _pair(a, b)
    if _undefined(x) or _undefined(y) or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(stats.spearmanr(x.ravel(), y.ravel()).statistic)


def center_of_mass(a: np.ndarray) -> tuple[float, float]:
    """Centre of mass of the positive part of a map, in pixel coordinates.

    Args:
        a: H×W map; negative values are clipped to 0.

    Returns:
        ``(row, col)``, pixel centres at integer coordinates; ``(nan, nan)`` if the map is
        non-finite or has no positive value.

    Raises:
        ValueError: ``a`` is not 2-D.
    """
    x = np.asarray(a, dtype=float)
    if x.ndim != 2:
        raise ValueError(f"a must be a 2-D H×W map, got shape {x.shape}")
    if _undefined(x):
        return float("nan"), float("nan")
    p = np.clip(x, 0, None)
    total = p.sum()
    if total <= 0:
        return float("nan"), float("nan")
    rows, cols = np.indices(x.shape)
    return float((p * rows).sum() / total), float((p * cols).sum() / total)


def com_shift(a: np.ndarray, b: np.ndarray) -> float:
    """Euclidean distance, in pixels, between the centres of mass of two maps.

    Args:
        a: H×W map.
        b: H×W map.

    Returns:
        Distance ``>= 0``; NaN if either centre of mass is undefined (see :func:`center_of_mass`).

    Raises:
        ValueError: shape mismatch or maps not 2-D.
    """
    x, y = _pair(a, b)
    ra, ca = center_of_mass(x)
    rb, cb = center_of_mass(y)
    return float(np.hypot(ra - rb, ca - cb))


def map_stability(maps: np.ndarray, reference: np.ndarray | None = None, k: float = 0.1) -> dict[str, float]:
    """Mean pairwise stability of T maps of one image under T perturbations.

    Args:
        maps: T×H×W maps (MC-dropout passes, inverted test-time augmentations, noisy inputs).
        reference: optional H×W unperturbed map. If given, each of the T maps is compared with it
            (T pairs); otherwise all ``T*(T-1)/2`` unordered pairs of ``maps`` are compared.
        k: top-k fraction for :func:`topk_agreement`, in ``(0, 1]``.

    Returns:
        ``topk_iou``, ``spearman``, ``com_shift_px``: means over the pairs where that metric is
        defined (NaN if none is); ``n_pairs``: number of pairs compared (0 without a reference
        and T < 2); ``n_undefined``: pairs where at least one metric was NaN;
        ``n_undefined_topk_iou`` / ``n_undefined_spearman`` / ``n_undefined_com_shift_px``: the
        same count per metric (each metric's mean excludes exactly these pairs).

    Raises:
        ValueError: ``maps`` not 3-D, ``reference`` not of shape H×W, or ``k`` not in ``(0, 1]``.
    """
    check_k(k)
    m = np.asarray(maps, dtype=float)
    if m.ndim != 3:
        raise ValueError(f"maps must be T×H×W, got shape {m.shape}")
    if reference is not None:
        ref = np.asarray(reference, dtype=float)
        if ref.shape != m.shape[1:]:
            raise ValueError(f"reference shape {ref.shape} != map shape {m.shape[1:]}")
        pairs = [(ref, m[t]) for t in range(len(m))]
    else:
        pairs = [(m[i], m[j]) for i, j in combinations(range(len(m)), 2)]
    fns = {"topk_iou": lambda a, b: topk_agreement(a, b, k), "spearman": rank_correlation, "com_shift_px": com_shift}
    vals = {name: np.array([fn(a, b) for a, b in pairs], dtype=float) for name, fn in fns.items()}
    out: dict[str, float] = {}
    for name, v in vals.items():
        ok = np.isfinite(v)
        out[name] = float(v[ok].mean()) if ok.any() else float("nan")
    any_nan = np.zeros(len(pairs), dtype=bool)
    for v in vals.values():
        any_nan |= ~np.isfinite(v)
    out["n_pairs"] = len(pairs)
    out["n_undefined"] = int(any_nan.sum())
    for name, v in vals.items():
        out[f"n_undefined_{name}"] = int((~np.isfinite(v)).sum())
    return out


def stability_vs_uncertainty(stability: np.ndarray, uncertainty: np.ndarray, correct: np.ndarray) -> dict:
    """Is explanation stability related to predictive uncertainty and to correctness?

    Args:
        stability: N per-image stability values (e.g. ``map_stability(...)["topk_iou"]``).
        uncertainty: N per-image uncertainties (e.g. predictive entropy, MC-dropout variance).
        correct: N booleans (or 0/1): whether the image's prediction was correct.

    Returns:
        dict with ``spearman_rho`` / ``spearman_p`` (stability vs uncertainty; NaN with fewer than
        3 images or a constant input), ``mean_stability_correct`` / ``mean_stability_incorrect``
        (NaN for an empty group), ``n_correct`` / ``n_incorrect``, ``mannwhitney_u`` /
        ``mannwhitney_p`` (two-sided ``scipy.stats.mannwhitneyu``, x = correct, y = incorrect, so
        U counts pairs where a correct image is more stable; None when a group has < 2 images),
        ``note`` (why the test was skipped, else None) and ``n_dropped`` (images whose stability
        or uncertainty was NaN/non-finite, removed before everything else).

    Raises:
        ValueError: inputs not 1-D of the same length.
    """
    s = np.asarray(stability, dtype=float)
    u = np.asarray(uncertainty, dtype=float)
    c = np.asarray(correct)
    if s.ndim != 1 or u.shape != s.shape or c.shape != s.shape:
        raise ValueError(f"stability, uncertainty and correct must be 1-D of one length, got shapes "
                         f"{s.shape}, {u.shape}, {c.shape}")
    keep = np.isfinite(s) & np.isfinite(u)
    s, u, c = s[keep], u[keep], c[keep].astype(bool)
    out: dict = {"n_dropped": int((~keep).sum())}
    if len(s) >= 3 and np.ptp(s) > 0 and np.ptp(u) > 0:
        res = stats.spearmanr(s, u)
        out["spearman_rho"], out["spearman_p"] = float(res.statistic), float(res.pvalue)
    else:
        out["spearman_rho"], out["spearman_p"] = float("nan"), float("nan")
    sc, si = s[c], s[~c]
    out["mean_stability_correct"] = float(sc.mean()) if len(sc) else float("nan")
    out["mean_stability_incorrect"] = float(si.mean()) if len(si) else float("nan")
    out["n_correct"], out["n_incorrect"] = int(len(sc)), int(len(si))
    if len(sc) < 2 or len(si) < 2:
        out["mannwhitney_u"] = out["mannwhitney_p"] = None
        out["note"] = (f"Mann-Whitney U test skipped: needs >= 2 images per group, got {len(sc)} correct "
                       f"and {len(si)} incorrect (after dropping {out['n_dropped']} NaN)")
    else:
        res = stats.mannwhitneyu(sc, si, alternative="two-sided")
        out["mannwhitney_u"], out["mannwhitney_p"] = float(res.statistic), float(res.pvalue)
        out["note"] = None
    return out
