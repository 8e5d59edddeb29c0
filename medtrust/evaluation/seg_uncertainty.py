"""Pixel uncertainty of a segmenter at evaluation (GlassBox: "is it confident at the core and unsure at
the boundary, and does it know where it is wrong?") and the conformal risk control of its false-negative
rate.

Samples: ``mc_samples`` passes with the dropout modules active (the rest in eval mode) times the flip
views (identity, ``hflip``, ``vflip``, both), each flipped back. From the S sampled probability maps:

* predictive entropy H(mean p) (total), expected entropy mean H(p_s) (aleatoric) and their difference,
  the mutual information (epistemic), per pixel;
* per image: mean predictive entropy against Dice (Spearman), and the quality-control curve (images
  referred to a human most-uncertain first: mean Dice of the images kept);
* per pixel: AUROC of the predictive entropy for the pixel errors of the thresholded mean map;
* confidence max(p, 1 - p) and entropy against the signed distance to the ground-truth boundary
  (positive inside the lesion), in pixels.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from medtrust.utils.logging import get_logger

log = get_logger(__name__)

FLIPS = {"hflip": [-1], "vflip": [-2]}


def _h(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return -(p * p.log() + (1 - p) * (1 - p).log())


@torch.inference_mode()
def sample_maps(task: torch.nn.Module, datamodule: Any, split: str, mc_samples: int, flips: Sequence[str],
                seed: int = 0) -> dict[str, torch.Tensor]:
    """Mean probability, predictive entropy, expected entropy and mutual information maps (N×1×H×W)
    of ``split`` over MC-dropout passes × flip views (running sums: memory O(N·H·W), not O(S·N·H·W))."""
    from medtrust.xai.perturb import active_dropout_modules

    bad = [f for f in flips if f not in FLIPS]
    if bad:
        raise ValueError(f"evaluation.uncertainty.flips: unknown {bad}; choose from {list(FLIPS)}")
    views: list[list[int]] = [[]] + [FLIPS[f] for f in flips] + ([[-2, -1]] if len(flips) == 2 else [])
    drops = active_dropout_modules(task)
    t = max(1, int(mc_samples)) if drops else 1
    if mc_samples > 0 and not drops:
        log.warning(f"evaluation.uncertainty.mc_samples={mc_samples} but {type(task.net).__name__} has no dropout "
                    "with p > 0: one pass per flip view")
    dev = next(task.parameters()).device
    was = task.training
    task.eval()
    means, ents = [], []
    try:
        for m in drops:
            m.train()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            for batch in datamodule.dataloader(split):
                x = batch["image"].to(dev)
                s_p = torch.zeros(x.shape[0], 1, *x.shape[-2:], dtype=torch.float64)
                s_h = torch.zeros_like(s_p)
                for _ in range(t):
                    for d in views:
                        p = torch.sigmoid(task(x.flip(d) if d else x)).double().cpu()
                        p = p.flip(d) if d else p
                        s_p += p
                        s_h += _h(p)
                n = t * len(views)
                means.append(s_p / n)
                ents.append(s_h / n)
    finally:
        for m in drops:
            m.eval()
        task.train(was)
    mean, expected = torch.cat(means), torch.cat(ents)
    total = _h(mean)
    return {"prob": mean.float(), "entropy": total.float(), "expected_entropy": expected.float(),
            "mutual_information": (total - expected).clamp_min(0).float(), "samples": torch.tensor(t * len(views)),
            "mc_passes": torch.tensor(t), "views": torch.tensor(len(views))}


def signed_distance(mask: np.ndarray) -> np.ndarray:
    """Signed distance of every pixel to the ground-truth boundary in pixels (scipy's Euclidean distance
    transform): inside the lesion the distance to the nearest background pixel (>= 1), outside minus the
    distance to the nearest lesion pixel (<= -1); +-1 are the two rings that touch the boundary."""
    from scipy.ndimage import distance_transform_edt

    m = mask.astype(bool)
    if not m.any():
        return np.full(m.shape, -np.inf)
    if m.all():
        return np.full(m.shape, np.inf)
    return np.where(m, distance_transform_edt(m), -distance_transform_edt(~m))


def boundary_profile(prob: torch.Tensor, entropy: torch.Tensor, masks: torch.Tensor, max_distance: int) -> list[dict[str, Any]]:
    """Mean confidence max(p, 1 - p), predictive entropy and error rate per signed distance to the boundary,
    in 1-pixel bins from -max_distance (outside) to +max_distance (inside); the ends collect everything beyond."""
    d = np.concatenate([np.clip(np.round(signed_distance(m[0].numpy() > 0.5)), -max_distance, max_distance).ravel()
                        for m in masks])
    p, h, y = prob.numpy().ravel(), entropy.numpy().ravel(), masks.numpy().ravel() > 0.5
    conf = np.maximum(p, 1 - p)
    err = (p >= 0.5) != y
    rows = []
    for k in range(-max_distance, max_distance + 1):
        sel = d == k
        if sel.any():
            rows.append({"distance_px": k, "side": "inside" if k > 0 else "outside" if k < 0 else "boundary",
                         "n_pixels": int(sel.sum()), "confidence": float(conf[sel].mean()),
                         "entropy": float(h[sel].mean()), "error_rate": float(err[sel].mean())})
    return rows


def qc_curve(dice: np.ndarray, uncertainty: np.ndarray, fractions: Sequence[float]) -> list[dict[str, float]]:
    """Mean Dice of the images kept when the ``fraction`` most uncertain are referred, with the oracle
    (the worst-Dice images referred) and random referral (the mean Dice) for comparison."""
    n = len(dice)
    by_unc = np.argsort(-uncertainty, kind="stable")
    by_dice = np.argsort(dice, kind="stable")
    rows = []
    for f in fractions:
        k = min(n - 1, int(round(f * n)))
        rows.append({"referred_fraction": float(f), "n_kept": n - k, "dice_kept": float(dice[by_unc[k:]].mean()),
                     "dice_kept_oracle": float(dice[by_dice[k:]].mean()), "dice_kept_random": float(dice.mean())})
    return rows


def pixel_error_auroc(prob: torch.Tensor, score: torch.Tensor, masks: torch.Tensor, threshold: float,
                      max_pixels: int, seed: int) -> float | None:
    """AUROC of a pixel score for the pixel errors of the thresholded map (a seeded subsample of at
    most ``max_pixels`` pixels); None when every pixel is right (or wrong)."""
    from sklearn.metrics import roc_auc_score

    err = ((prob >= threshold) != (masks > 0.5)).numpy().ravel()
    s = score.numpy().ravel()
    if len(s) > max_pixels:
        idx = np.random.default_rng(seed).choice(len(s), max_pixels, replace=False)
        err, s = err[idx], s[idx]
    if err.all() or not err.any():
        return None
    return float(roc_auc_score(err, s))


def uncertainty_block(task: torch.nn.Module, datamodule: Any, split: str, masks: torch.Tensor, dice: np.ndarray,
                      threshold: float, c: Any, seed: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, np.ndarray]]:
    """``(summary, tables, per-image columns)`` of the pixel uncertainty of ``split``."""
    from scipy.stats import spearmanr

    u = c.uncertainty
    maps = sample_maps(task, datamodule, split, int(u.mc_samples), list(u.flips), seed)
    per = {f"mean_{k}": maps[k].flatten(1).mean(1).numpy() for k in ("entropy", "expected_entropy", "mutual_information")}
    ok = np.isfinite(dice)

    def rho(v: np.ndarray) -> dict[str, Any]:
        if ok.sum() < 3 or np.ptp(v[ok]) == 0 or np.ptp(dice[ok]) == 0:
            return {"rho": None, "p": None, "n": int(ok.sum())}
        r = spearmanr(v[ok], dice[ok])
        return {"rho": float(r.statistic), "p": float(r.pvalue), "n": int(ok.sum())}

    max_px = int(u.max_pixels)
    summary = {
        "samples": int(maps["samples"]), "mc_passes": int(maps["mc_passes"]), "flip_views": int(maps["views"]),
        "pixel_error_auroc": {k: pixel_error_auroc(maps["prob"], maps[k], masks, threshold, max_px, seed)
                              for k in ("entropy", "mutual_information", "expected_entropy")},
        "pixel_error_auroc_note": f"pixel errors of the mean map at threshold {threshold}; a seeded subsample of at "
                                  f"most {max_px} pixels",
        "spearman_uncertainty_vs_dice": {k: rho(v) for k, v in per.items()},
        "mean": {k: float(v.mean()) for k, v in per.items()},
    }
    qc = qc_curve(dice[ok], per["mean_entropy"][ok], list(u.qc_fractions)) if ok.sum() > 1 else []
    prof = boundary_profile(maps["prob"], maps["entropy"], masks, int(u.boundary_max_distance))
    if qc:
        base = qc[0]["dice_kept"]
        at = {r["referred_fraction"]: r for r in qc}
        summary["qc"] = {"dice_all": base, **{f"dice_kept_refer_{int(f * 100)}pct": at[f]["dice_kept"]
                                              for f in (0.1, 0.2) if f in at}}
    inside = [r for r in prof if r["distance_px"] >= 3]
    edge = [r for r in prof if abs(r["distance_px"]) <= 1]
    if inside and edge:
        summary["boundary"] = {"confidence_core": float(np.average([r["confidence"] for r in inside],
                                                                   weights=[r["n_pixels"] for r in inside])),
                               "confidence_boundary": float(np.average([r["confidence"] for r in edge],
                                                                       weights=[r["n_pixels"] for r in edge])),
                               "core": ">= 3 px inside the lesion", "boundary_band": "within 1 px of the boundary"}
    return summary, {"qc_curve": qc, "boundary": prof, "maps": maps}, per


def crc_block(probs: torch.Tensor, masks: torch.Tensor, crc: Mapping[str, Any], model_threshold: float,
              split: str) -> dict[str, Any]:
    """The conformal FNR threshold (fitted on the calibration images' FNR curves), applied to ``split``:
    the achieved FNR (mean over images with a lesion) and its cost in precision and Dice against the
    model's threshold."""
    from medtrust.metrics.conformal import fnr_curve
    from medtrust.metrics.segmentation import compute_confusion, compute_segmentation_metrics, per_image_scores

    t = float(crc["threshold"])
    fitted_on = str(crc.get("fitted_on", ""))
    out: dict[str, Any] = {**{k: crc[k] for k in ("alpha", "threshold", "bound_on_fitted")},
                           "n_lesion_fitted": crc["n_lesion"], "fitted_on": fitted_on, "reported_on": split,
                           "in_sample": fitted_on.split(" ")[0] == split}
    for name, thr in (("conformal", t), ("model", model_threshold)):
        fnr = fnr_curve(probs, masks, [thr])[:, 0]
        conf = compute_confusion(probs, masks, thr)
        seg = compute_segmentation_metrics(conf)
        per = per_image_scores(conf)
        out[name] = {"threshold": thr, "fnr_mean": float(fnr.mean()) if len(fnr) else None,
                     "n_lesion": int(len(fnr)), "precision_pixels": seg["precision"],
                     "precision_mean": float(np.nanmean(per["precision"].numpy())), "dice": seg["dice"],
                     "recall_pixels": seg["recall"]}
    return out
