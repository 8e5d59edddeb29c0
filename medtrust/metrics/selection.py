"""Statistics of MINIM's quality loop: how a share of generated images changes after fine-tuning
(paired: the same prompts and seeds before and after), and what a selector's filtering does to the
make-up of the images it keeps.

The unit of resampling is the *prompt*: the samples of one prompt are not independent (same text,
related images), so every CI resamples prompts (a cluster bootstrap) and every p-value permutes
within prompts, never images.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import binomtest, chi2_contingency, permutation_test

from medtrust.metrics.stats import bootstrap_interval


def wilson(k: int, n: int) -> list[float] | None:
    """The Wilson score 95 % interval of ``k`` successes in ``n`` (None for n = 0)."""
    if n == 0:
        return None
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=0.95, method="wilson")
    return [float(ci.low), float(ci.high)]


def _cluster_means(values: np.ndarray, clusters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sum and count of ``values`` (clusters in first-appearance order)."""
    codes, uniq = pd.factorize(pd.Series(clusters), sort=False)
    sums = np.bincount(codes, weights=values.astype(float), minlength=len(uniq))
    counts = np.bincount(codes, minlength=len(uniq)).astype(float)
    return sums, counts


def cluster_mean_ci(values: np.ndarray | Sequence[float], clusters: np.ndarray | Sequence[Any], n_boot: int = 2000,
                    seed: int = 0, method: str = "BCa") -> list[float] | None:
    """Bootstrap 95 % CI of the image-level mean of ``values``, resampling whole clusters."""
    v = np.asarray(values, dtype=float)
    sums, counts = _cluster_means(v, np.asarray(clusters))
    if len(sums) < 2:
        return None

    def stat(i: np.ndarray) -> float:
        return float(sums[i].sum() / counts[i].sum())

    lo, hi, _ = bootstrap_interval(stat, (np.arange(len(sums)),), n_boot=int(n_boot), rng=np.random.default_rng(seed),
                                   method=method)
    return [lo, hi] if np.isfinite([lo, hi]).all() else None


def paired_share_change(before: np.ndarray | Sequence[bool], after: np.ndarray | Sequence[bool],
                        clusters: np.ndarray | Sequence[Any], n_boot: int = 2000, n_perm: int = 9999,
                        seed: int = 0) -> dict[str, Any]:
    """The share of images with a property before and after, image ``i`` of both made from the same
    prompt and seed: shares with Wilson CIs, the difference ``after - before`` with a cluster-bootstrap
    CI (prompts resampled), a sign-flip permutation p of the per-prompt differences (two-sided; no
    change under the null) and McNemar's exact test on the discordant images (ignores clustering;
    given for reference).

    Returns:
        ``{"before", "before_ci", "after", "after_ci", "diff", "diff_ci", "p_permutation", "p_mcnemar",
        "n_images", "n_prompts", "discordant": {"gained", "lost"}}``.

    Raises:
        ValueError: arrays of different lengths.
    """
    b, a = np.asarray(before, dtype=bool), np.asarray(after, dtype=bool)
    c = np.asarray(clusters)
    if not (len(b) == len(a) == len(c)):
        raise ValueError(f"paired_share_change: {len(b)} before, {len(a)} after, {len(c)} cluster ids")
    n = len(b)
    out: dict[str, Any] = {"n_images": int(n), "n_prompts": int(len(set(c.tolist()))),
                           "before": float(b.mean()) if n else None, "before_ci": wilson(int(b.sum()), n),
                           "after": float(a.mean()) if n else None, "after_ci": wilson(int(a.sum()), n)}
    if n == 0:
        return {**out, "diff": None, "diff_ci": None, "p_permutation": None, "p_mcnemar": None}
    d = a.astype(float) - b.astype(float)
    out["diff"] = float(d.mean())
    out["diff_ci"] = cluster_mean_ci(d, c, n_boot, seed)
    sums, counts = _cluster_means(d, c)
    if len(sums) >= 2 and np.any(sums != 0):
        # per-prompt differences, sign-flipped (paired permutation); statistic = image-level mean
        res = permutation_test((sums,), lambda x, axis=-1: np.sum(x, axis=axis) / counts.sum(), vectorized=True,
                               permutation_type="samples", n_resamples=int(n_perm), alternative="two-sided",
                               rng=np.random.default_rng(seed))
        out["p_permutation"] = float(res.pvalue)
    else:
        out["p_permutation"] = 1.0
    gained, lost = int(((~b) & a).sum()), int((b & ~a).sum())
    out["discordant"] = {"gained": gained, "lost": lost}
    out["p_mcnemar"] = float(binomtest(gained, gained + lost).pvalue) if gained + lost else 1.0
    return out


def kept_composition(df: pd.DataFrame, attributes: Sequence[str], kept: str = "kept", cluster: str = "prompt_id",
                     n_boot: int = 1000, seed: int = 0, min_group_size: int = 10,
                     truth: str | None = None) -> dict[str, Any]:
    """What filtering does to who and what is kept: per attribute and group, the share among all images,
    the share among kept images and their difference (cluster-bootstrap CI), and the group's keep rate
    (Wilson CI); per attribute a chi-square test of independence of group and kept, and the gap
    between the highest and lowest keep rate of groups of at least ``min_group_size`` images.

    With ``truth`` (a boolean column: the image deserves to be kept, e.g. top-rated by a known quality
    function), a group's keep rate splits into what the images are and what the filter does with them:
    ``truth_rate`` (the group's share of deserving images) and ``recall`` (the share of its deserving
    images that are kept) with Wilson CIs, and per attribute ``recall_gap``. Unequal keep rates with equal
    recalls come from the images, not from the filter.

    Returns:
        ``{"n", "n_kept", "keep_rate", "attributes": {attr: {"groups": {...}, "chi2_p", "keep_rate_gap",
        "keep_rate_ratio", "insufficient": [...]}}}``.
    """
    k = df[kept].to_numpy(bool)
    t = df[truth].to_numpy(bool) if truth is not None else None
    clusters = df[cluster].to_numpy() if cluster in df else np.arange(len(df))
    n, nk = len(df), int(k.sum())
    out: dict[str, Any] = {"n": int(n), "n_kept": nk, "keep_rate": nk / n if n else None,
                           "keep_rate_ci": wilson(nk, n), "attributes": {}}
    codes, uniq = pd.factorize(pd.Series(clusters), sort=False)
    per_n = np.bincount(codes, minlength=len(uniq)).astype(float)          # images per prompt
    per_k = np.bincount(codes, weights=k.astype(float), minlength=len(uniq))  # kept images per prompt
    for attr in attributes:
        if attr not in df:
            continue
        g = df[attr].astype(str).to_numpy()
        groups: dict[str, Any] = {}
        for name in sorted(set(g.tolist())):
            sel = g == name
            m, mk = int(sel.sum()), int((sel & k).sum())
            share_all, share_kept = m / n, (mk / nk if nk else None)
            per_s = np.bincount(codes, weights=sel.astype(float), minlength=len(uniq))
            per_sk = np.bincount(codes, weights=(sel & k).astype(float), minlength=len(uniq))

            def change(i: np.ndarray, per_s=per_s, per_sk=per_sk) -> float:  # resampled prompts
                kept_n = per_k[i].sum()
                if kept_n == 0:
                    return float("nan")
                return float(per_sk[i].sum() / kept_n - per_s[i].sum() / per_n[i].sum())

            ci = None
            if nk and len(uniq) >= 2 and n_boot > 0:
                lo, hi, _ = bootstrap_interval(change, (np.arange(len(uniq)),), n_boot=int(n_boot),
                                               rng=np.random.default_rng(seed), method="percentile")
                ci = [lo, hi] if np.isfinite([lo, hi]).all() else None
            groups[name] = {"n": m, "n_kept": mk, "share_all": share_all, "share_kept": share_kept,
                            "share_change": (share_kept - share_all) if share_kept is not None else None,
                            "share_change_ci": ci, "keep_rate": mk / m if m else None, "keep_rate_ci": wilson(mk, m)}
            if t is not None:
                mt, mtk = int((sel & t).sum()), int((sel & t & k).sum())
                groups[name].update({"n_truth": mt, "truth_rate": mt / m if m else None, "truth_rate_ci": wilson(mt, m),
                                     "recall": mtk / mt if mt else None, "recall_ci": wilson(mtk, mt)})
        table = pd.crosstab(g, k)
        p = None
        # defined when every group and both outcomes occur (a zero cell is fine: its expected count is not 0)
        if table.shape == (len(groups), 2) and len(groups) > 1 and (table.to_numpy().sum(0) > 0).all():
            p = float(chi2_contingency(table.to_numpy())[1])
        big = {name: v for name, v in groups.items() if v["n"] >= min_group_size}
        rates = [v["keep_rate"] for v in big.values()]
        out["attributes"][attr] = {
            "groups": groups, "chi2_p": p,
            "keep_rate_gap": (max(rates) - min(rates)) if len(rates) >= 2 else None,
            "keep_rate_ratio": (min(rates) / max(rates)) if len(rates) >= 2 and max(rates) > 0 else None,
            "insufficient": sorted(name for name, v in groups.items() if v["n"] < min_group_size)}
        if t is not None:
            recalls = [v["recall"] for v in big.values() if v["recall"] is not None]
            out["attributes"][attr]["recall_gap"] = (max(recalls) - min(recalls)) if len(recalls) >= 2 else None
    return out
