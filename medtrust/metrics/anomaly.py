"""Metrics of an anomaly detector on the artifact benchmark (SAFEGEN), per cohort and overall.

Image level: AUROC of the image score, injected (label 1) against clean (label 0) images, with a
stratified bootstrap CI (positives and negatives resampled within themselves); the share flagged at
the image threshold. Pixel level: AUROC of the anomaly map over the pixels of the cohort's injected
images and of the clean images (every clean pixel is negative); Dice and IoU of the thresholded map
against the artifact mask (the project's confusion counts); pointing game and relevance mass
(:mod:`medtrust.metrics.localisation`). Severity: Spearman ρ between the image score and the severity
of the cohort's injected images. The seed's "ρ between heatmap and annotations", with no radiologists
here, is redefined as the mean over injected images of the Spearman ρ between the map and the mask
(``spearman_map_mask``). Against a binary mask it reaches 1 only for a map that is constant inside and
outside the mask: a map that separates a 4-pixel mask from 60 background pixels perfectly, with noise
within each, gives about 0.4, so it is not on the scale of the seed's 0.80 (a unit test shows this).
:func:`paired_wilcoxon` compares two detectors on the same images.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr, wilcoxon
from torchmetrics.functional.classification import binary_auroc

from medtrust.metrics.localisation import pointing_game, relevance_mass
from medtrust.metrics.segmentation import compute_confusion, per_image_scores
from medtrust.metrics.stats import bootstrap_interval


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(binary_auroc(torch.tensor(np.array(scores, dtype=np.float64)), torch.tensor(np.array(labels)).long()))


def auroc_with_ci(scores: np.ndarray, labels: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, list[float] | None]:
    """AUROC and its stratified bootstrap 95 % CI (None without both classes or ``n_boot`` = 0)."""
    scores, labels = np.asarray(scores, float), np.asarray(labels).astype(int)
    value = _auroc(scores, labels)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    if n_boot <= 0 or len(pos) < 2 or len(neg) < 2:
        return value, None

    def stat(p: np.ndarray, n: np.ndarray) -> float:
        idx = np.concatenate([p, n])
        return _auroc(scores[idx], labels[idx])

    lo, hi, _ = bootstrap_interval(stat, (pos, neg), n_boot=int(n_boot), rng=np.random.default_rng(seed),
                                   method="percentile")
    return value, [lo, hi] if np.isfinite([lo, hi]).all() else None


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def _mean(v: Sequence[float]) -> float | None:
    v = np.asarray(v, float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else None


def group_metrics(scores: np.ndarray, labels: np.ndarray, severities: np.ndarray, maps: np.ndarray, masks: np.ndarray,
                  pixel_threshold: float | None, image_threshold: float | None, n_boot: int = 1000,
                  seed: int = 0, max_pixels: int = 2_000_000) -> dict[str, Any]:
    """The metrics of one group of rows (a cohort's injected images + the clean images).

    ``maps`` and ``masks`` are N×H×W; pixel AUROC subsamples at most ``max_pixels`` pixels (seeded)."""
    labels = np.asarray(labels).astype(int)
    pos = labels == 1
    out: dict[str, Any] = {"n_injected": int(pos.sum()), "n_clean": int((~pos).sum())}
    out["auroc"], out["auroc_ci"] = auroc_with_ci(scores, labels, n_boot=n_boot, seed=seed)
    if image_threshold is not None:
        flagged = np.asarray(scores) > image_threshold
        out["flagged_injected"] = float(flagged[pos].mean()) if pos.any() else None
        out["flagged_clean"] = float(flagged[~pos].mean()) if (~pos).any() else None
    # pixels: injected images' masks, clean images all negative
    m = np.asarray(masks, bool)
    px_s, px_t = np.asarray(maps, np.float64).ravel(), m.ravel()
    if len(px_s) > max_pixels:
        keep = np.random.default_rng(seed).choice(len(px_s), max_pixels, replace=False)
        px_s, px_t = px_s[keep], px_t[keep]
    out["pixel_auroc"] = _auroc(px_s, px_t.astype(int))
    if pos.any():
        pm, mm = np.asarray(maps)[pos], m[pos]
        if pixel_threshold is not None:
            conf = compute_confusion(torch.as_tensor(pm >= pixel_threshold, dtype=torch.float32),
                                     torch.as_tensor(mm, dtype=torch.float32))
            s = per_image_scores(conf)
            out["dice"], out["iou"] = float(s["dice"].mean()), float(s["iou"].mean())
        out["pointing_game"] = _mean([pointing_game(h, k) for h, k in zip(pm, mm)])
        out["relevance_mass"] = _mean([relevance_mass(np.clip(h, 0, None), k) for h, k in zip(pm, mm)])
        out["spearman_map_mask"] = _mean([_spearman(h, k) for h, k in zip(pm, mm)])
        sev = np.asarray(severities)[pos]
        out["spearman_severity"] = _spearman(np.asarray(scores)[pos], sev)
    return out


def benchmark_metrics(scores: np.ndarray, labels: np.ndarray, cohorts: Sequence[str], severities: np.ndarray,
                      maps: np.ndarray, masks: np.ndarray, pixel_threshold: float | None = None,
                      image_threshold: float | None = None, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """``{"overall": {...}, "cohorts": {name: {...}}}``: every cohort against all clean images.

    Raises:
        ValueError: arrays of different lengths, or no clean images (AUROC needs negatives).
    """
    n = len(scores)
    if not (len(labels) == len(cohorts) == len(severities) == len(maps) == len(masks) == n):
        raise ValueError("scores, labels, cohorts, severities, maps and masks must have one row per image")
    labels = np.asarray(labels).astype(int)
    if not (labels == 0).any():
        raise ValueError("the benchmark holds no clean images: an AUROC needs the negative class")
    cohorts = np.asarray(cohorts, dtype=object)
    args = dict(pixel_threshold=pixel_threshold, image_threshold=image_threshold, n_boot=n_boot, seed=seed)
    maps, masks, scores, severities = np.asarray(maps), np.asarray(masks), np.asarray(scores), np.asarray(severities)
    out: dict[str, Any] = {"overall": group_metrics(scores, labels, severities, maps, masks, **args), "cohorts": {}}
    clean = labels == 0
    for c in sorted(set(cohorts[labels == 1].tolist())):
        sel = clean | ((cohorts == c) & (labels == 1))
        out["cohorts"][c] = group_metrics(scores[sel], labels[sel], severities[sel], maps[sel], masks[sel], **args)
    return out


def kind_aurocs(scores: np.ndarray, labels: np.ndarray, kinds: Sequence[str], severities: np.ndarray,
                n_boot: int = 1000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Image AUROC [95 % CI] of every artifact kind (e.g. ``ghosting``) against all clean images, with its
    number of injected images and Spearman rho(score, severity): a cohort's AUROC can hide one kind the
    detector cannot see (clean rows are those with label 0; their kind is ignored)."""
    scores, labels = np.asarray(scores, float), np.asarray(labels).astype(int)
    kinds, severities = np.asarray(kinds, dtype=object), np.asarray(severities)
    if not (len(scores) == len(labels) == len(kinds) == len(severities)):
        raise ValueError("scores, labels, kinds and severities must have one row per image")
    clean = labels == 0
    out: dict[str, dict[str, Any]] = {}
    for k in sorted(set(kinds[labels == 1].tolist())):
        inj = (kinds == k) & (labels == 1)
        sel = clean | inj
        auc, ci = auroc_with_ci(scores[sel], labels[sel], n_boot, seed)
        out[str(k)] = {"n_injected": int(inj.sum()), "auroc": auc, "auroc_ci": ci,
                       "spearman_severity": _spearman(scores[inj], severities[inj])}
    return out


def paired_wilcoxon(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Wilcoxon signed-rank test of two detectors' per-image values on the same images (NaN pairs dropped)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape:
        raise ValueError(f"paired values of different lengths ({len(a)} vs {len(b)})")
    ok = np.isfinite(a) & np.isfinite(b)
    d = a[ok] - b[ok]
    if len(d) < 2 or not np.any(d):
        return {"n": int(len(d)), "statistic": None, "p": 1.0 if len(d) else None,
                "median_diff": float(np.median(d)) if len(d) else None}
    r = wilcoxon(a[ok], b[ok])
    return {"n": int(len(d)), "statistic": float(r.statistic), "p": float(r.pvalue), "median_diff": float(np.median(d))}


def placement_values(scores: Sequence[float], labels: Sequence[int]) -> np.ndarray:
    """Per injected image, the share of clean images it outscores (ties count half): the image's own
    part of the AUROC (their mean is the AUROC), on one scale for every detector."""
    s, y = np.asarray(scores, float), np.asarray(labels).astype(int)
    neg = np.sort(s[y == 0])
    if not len(neg):
        raise ValueError("placement values need clean images (label 0)")
    pos = s[y == 1]
    below = np.searchsorted(neg, pos, side="left")
    ties = np.searchsorted(neg, pos, side="right") - below
    return (below + 0.5 * ties) / len(neg)


def compare_detectors(a: Sequence[float], b: Sequence[float], labels: Sequence[int], n_boot: int = 1000,
                      seed: int = 0) -> dict[str, Any]:
    """Detector ``a`` against ``b`` on the same images: both AUROCs, their difference with a paired
    stratified bootstrap 95 % CI (the same resampled images for both), and the Wilcoxon signed-rank test
    of the injected images' placement values (:func:`placement_values`).

    Raises:
        ValueError: different lengths, or one class missing.
    """
    a, b, y = np.asarray(a, float), np.asarray(b, float), np.asarray(labels).astype(int)
    if not (len(a) == len(b) == len(y)):
        raise ValueError(f"paired scores of different lengths ({len(a)}, {len(b)}, {len(y)} labels)")
    if len(np.unique(y)) < 2:
        raise ValueError("comparing detectors needs injected and clean images")
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)

    def diff(p: np.ndarray, n: np.ndarray) -> float:
        idx = np.concatenate([p, n])
        return _auroc(a[idx], y[idx]) - _auroc(b[idx], y[idx])

    out: dict[str, Any] = {"n_injected": int(len(pos)), "n_clean": int(len(neg)), "auroc_a": _auroc(a, y),
                           "auroc_b": _auroc(b, y)}
    out["diff"] = out["auroc_a"] - out["auroc_b"]
    out["diff_ci"] = None
    if n_boot > 0 and len(pos) >= 2 and len(neg) >= 2:
        lo, hi, _ = bootstrap_interval(diff, (pos, neg), n_boot=int(n_boot), rng=np.random.default_rng(seed),
                                       method="percentile")
        out["diff_ci"] = [lo, hi] if np.isfinite([lo, hi]).all() else None
    out["wilcoxon"] = paired_wilcoxon(placement_values(a, y), placement_values(b, y))
    return out
