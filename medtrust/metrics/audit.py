"""Statistics of the bias, validity and hallucination audit of a generator (RoentGen audit, issue 15).

Every audited figure is a share of images (a true-positive rate, a selection rate, a flag rate), i.e.
the mean of a 0/1 vector per group. That fixes the statistics:

- a group's rate gets a Wilson 95 % interval (:func:`medtrust.metrics.selection.wilson`);
- a **disparity** over the groups of one attribute (e.g. TPR over race) is the gap between the highest
  and the lowest group, with the ratio lowest / highest. Its CI must hold although the pair was *chosen*
  because it is the most extreme (with three equal groups the chosen pair's ordinary 95 % CI misses 0
  far more often than 5 %). So the CI is a **simultaneous** bootstrap interval over every pair of
  groups (max-T: the 95th percentile of ``max_ij |d*_ij - d_ij| / se_ij`` over resamples, each group
  resampled within itself), which covers the chosen pair's true difference at >= 95 % whichever pair
  is chosen; ``p`` is a permutation test of "all groups equal" on the max - min statistic (group labels
  shuffled), which also accounts for the choice;
- the **selection-rate shift** of a group between prompts with and without demographic terms is the
  mean paired difference over counterfactual pairs (same prompt, seed and initial noise), with a paired
  bootstrap CI over pairs;
- the **hallucination** rate of a classifier is its flag rate on generated images whose prompt did not
  ask for the finding; what counts is the **excess** over the same classifier's flag rate on real
  images without the finding (its own false positives), with a two-sample bootstrap CI and a one-sided
  Fisher exact test. When the classifier's sensitivity on real images with the finding is known, the
  rate of images that truly show it is estimated by the Rogan-Gladen correction
  ``(rate - fpr) / (sensitivity - fpr)``, with a bootstrap CI over all three samples. It assumes the
  classifier errs on generated images as on real ones (true by construction on the phantom generator).

The bootstrap of a 0/1 mean is drawn as ``Binomial(n, p_hat) / n``: the exact distribution of the
resampled mean, so no index arrays are built and 2,000 resamples of every group cost microseconds
(the known-truth coverage study repeats whole audits hundreds of times). A cell with fewer than
``min_n`` images is ``{"status": "insufficient", "n": n}``, never a rate.
"""
from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import fisher_exact, norm

from medtrust.metrics.selection import wilson

INSUFFICIENT = "insufficient"


def _v(x: Any) -> np.ndarray:
    a = np.asarray(x, dtype=float).ravel()
    if a.size and not np.isin(a, (0.0, 1.0)).all():
        raise ValueError("audit rates take 0/1 values per image")
    return a


def _f(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def insufficient(n: int) -> dict[str, Any]:
    return {"status": INSUFFICIENT, "n": int(n)}


def rate(x: Sequence[float], min_n: int = 1) -> dict[str, Any]:
    """Share of ones with its Wilson 95 % CI; ``insufficient`` below ``min_n`` images."""
    a = _v(x)
    if len(a) < max(1, int(min_n)):
        return insufficient(len(a))
    k = int(a.sum())
    return {"status": "ok", "n": int(len(a)), "k": k, "rate": k / len(a), "ci": wilson(k, len(a))}


def boot_means(x: Sequence[float], n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``n_boot`` bootstrap resamples of the mean of a 0/1 vector (exact: Binomial(n, p_hat) / n)."""
    a = _v(x)
    if not len(a):
        return np.full(n_boot, np.nan)
    return rng.binomial(len(a), a.mean(), size=n_boot) / len(a)


def _simultaneous(p: np.ndarray, boot: np.ndarray, hi: int, lo: int, alpha: float) -> tuple[list[float], float]:
    """The max-T simultaneous interval of ``p[hi] - p[lo]`` over every pair of groups (``boot``: G x B
    resampled values of ``p``), and its critical value."""
    t = np.zeros(boot.shape[1])
    se = {}
    for i, j in itertools.combinations(range(len(p)), 2):
        d_star = boot[i] - boot[j]
        ok = np.isfinite(d_star)
        s = float(d_star[ok].std(ddof=1)) if ok.sum() > 1 else 0.0
        se[(i, j)] = s
        if s > 0:
            t = np.maximum(t, np.where(ok, np.abs(d_star - (p[i] - p[j])) / s, np.inf))
    z = float(norm.ppf(1 - alpha / 2))
    c = max(float(np.quantile(t, 1 - alpha)), z) if t.any() else z  # never narrower than the pair's own
    s = se[(min(hi, lo), max(hi, lo))]
    gap = float(p[hi] - p[lo])
    return [gap - c * s, gap + c * s], c


def disparity(groups: Mapping[str, Sequence[float]], min_n: int = 10, n_boot: int = 2000, n_perm: int = 2000,
              seed: int = 0, alpha: float = 0.05,
              correction: tuple[Sequence[float], Sequence[float]] | None = None) -> dict[str, Any]:
    """Per-group rates and the gap between the highest and the lowest sufficient group.

    Returns ``{"groups": {g: rate block}, "gap", "gap_ci" (simultaneous over all pairs), "ratio",
    "ratio_ci", "highest", "lowest", "p" (permutation, all groups equal), "n_groups"}``; gap fields are
    None with fewer than two sufficient groups. ``correction=(flags on real positives, flags on real
    negatives)`` adds ``corrected``: the gap divided by the classifier's Youden J (Rogan-Gladen per
    group), i.e. an estimate of the generator's own gap (how often it draws what was asked), its
    simultaneous CI resampling J too.
    """
    vecs = {str(g): _v(x) for g, x in groups.items()}
    out: dict[str, Any] = {"groups": {g: rate(x, min_n) for g, x in vecs.items()}}
    ok = [g for g, x in vecs.items() if len(x) >= max(1, int(min_n))]
    out["n_groups"] = len(ok)
    none = {"gap": None, "gap_ci": None, "ratio": None, "ratio_ci": None, "highest": None, "lowest": None, "p": None}
    if len(ok) < 2:
        return {**out, **none, **({"corrected": {"gap": None, "gap_ci": None, "youden_j": None}} if correction else {})}
    rng = np.random.default_rng(seed)
    p = np.array([vecs[g].mean() for g in ok])
    hi, lo = int(np.argmax(p)), int(np.argmin(p))
    if hi == lo:  # all equal: any two
        hi, lo = 0, 1
    boot = np.stack([boot_means(vecs[g], n_boot, rng) for g in ok])  # G x B
    gap = float(p[hi] - p[lo])
    gap_ci, c = _simultaneous(p, boot, hi, lo, alpha)
    # the ratio's interval at the same (simultaneous) level: percentiles of the pair's bootstrap ratio
    level = 2 * norm.cdf(c) - 1
    with np.errstate(divide="ignore", invalid="ignore"):
        r_star = boot[lo] / boot[hi]
    r_star = r_star[np.isfinite(r_star)]
    ratio = float(p[lo] / p[hi]) if p[hi] > 0 else None
    ratio_ci = ([float(np.quantile(r_star, (1 - level) / 2)), float(np.quantile(r_star, 1 - (1 - level) / 2))]
                if ratio is not None and len(r_star) >= n_boot // 2 else None)
    # permutation test of "all groups equal" on max - min
    pooled = np.concatenate([vecs[g] for g in ok])
    sizes = np.array([len(vecs[g]) for g in ok])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    perm = np.stack([rng.permutation(pooled) for _ in range(max(1, int(n_perm)))])  # P x N
    means = np.add.reduceat(perm, starts, axis=1) / sizes
    null = means.max(1) - means.min(1)
    p_value = float((1 + np.sum(null >= gap - 1e-12)) / (1 + len(null)))
    out.update({"gap": gap, "gap_ci": gap_ci, "ratio": ratio, "ratio_ci": ratio_ci, "highest": ok[hi],
                "lowest": ok[lo], "p": p_value, "critical_value": c})
    if correction is not None:
        s, f = _v(correction[0]), _v(correction[1])
        j = float(s.mean() - f.mean()) if len(s) and len(f) else float("nan")
        if len(s) >= min_n and len(f) >= min_n and j > 0:
            j_star = boot_means(s, n_boot, rng) - boot_means(f, n_boot, rng)
            with np.errstate(divide="ignore", invalid="ignore"):
                q_star = np.where(j_star > 0, boot / j_star, np.nan)
            ci, _ = _simultaneous(p / j, q_star, hi, lo, alpha)
            out["corrected"] = {"gap": gap / j, "gap_ci": ci, "youden_j": j, "sensitivity": float(s.mean()),
                                "fpr": float(f.mean())}
        else:
            out["corrected"] = {"gap": None, "gap_ci": None, "youden_j": _f(j)}
    return out


def paired_shift(with_terms: Sequence[float], without_terms: Sequence[float], min_n: int = 10, n_boot: int = 2000,
                 seed: int = 0) -> dict[str, Any]:
    """Mean of ``with - without`` over counterfactual pairs (0/1 each), a paired bootstrap 95 % CI, and the
    relative shift (the change over the rate without the terms, the paper's "26 % deviation")."""
    a, b = _v(with_terms), _v(without_terms)
    if len(a) != len(b):
        raise ValueError(f"paired values of different lengths ({len(a)} with, {len(b)} without)")
    if len(a) < max(1, int(min_n)):
        return insufficient(len(a))
    d = a - b
    rng = np.random.default_rng(seed)
    # resampled pairs: the counts of the four outcomes (without, with) = 00, 01, 10, 11 are multinomial
    cell = (2 * b + a).astype(int)
    counts = rng.multinomial(len(d), np.bincount(cell, minlength=4) / len(d), size=n_boot)
    w_star = (counts[:, 1] + counts[:, 3]) / len(d)
    wo_star = (counts[:, 2] + counts[:, 3]) / len(d)
    boot = w_star - wo_star
    base = float(b.mean())
    with np.errstate(divide="ignore", invalid="ignore"):
        rel_star = np.where(wo_star > 0, boot / wo_star, np.nan) if base > 0 else None
    shift = float(d.mean())
    return {"status": "ok", "n_pairs": int(len(d)), "rate_with": float(a.mean()), "rate_without": base,
            "shift": shift, "shift_ci": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))],
            "relative_shift": shift / base if base > 0 else None,
            "relative_shift_ci": ([float(np.nanquantile(rel_star, 0.025)), float(np.nanquantile(rel_star, 0.975))]
                                  if rel_star is not None else None),
            "changed": int((d != 0).sum())}


def excess_rate(generated: Sequence[float], real_negatives: Sequence[float], real_positives: Sequence[float] | None = None,
                min_n: int = 10, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """A classifier's flag rate on generated images against its flag rate on real images without the
    finding: ``rate, real_rate, excess, excess_ci`` (two-sample bootstrap), Fisher's one-sided p; with
    ``real_positives`` (its flags on real images with the finding) also ``sensitivity`` and the
    Rogan-Gladen estimate ``corrected`` (the share of generated images that truly show the finding) with
    its CI. Cells below ``min_n`` are ``insufficient``."""
    g, r = _v(generated), _v(real_negatives)
    if len(g) < max(1, int(min_n)) or len(r) < max(1, int(min_n)):
        return {**insufficient(len(g)), "n_real": int(len(r))}
    rng = np.random.default_rng(seed)
    bg, br = boot_means(g, n_boot, rng), boot_means(r, n_boot, rng)
    exc = bg - br
    table = [[int(g.sum()), int(len(g) - g.sum())], [int(r.sum()), int(len(r) - r.sum())]]
    out: dict[str, Any] = {
        "status": "ok", "n": int(len(g)), "n_real": int(len(r)), "rate": float(g.mean()), "rate_ci": rate(g)["ci"],
        "real_rate": float(r.mean()), "real_rate_ci": rate(r)["ci"], "excess": float(g.mean() - r.mean()),
        "excess_ci": [float(np.quantile(exc, 0.025)), float(np.quantile(exc, 0.975))],
        "p": float(fisher_exact(table, alternative="greater").pvalue)}
    if real_positives is not None:
        pos = _v(real_positives)
        if len(pos) >= max(1, int(min_n)):
            bs = boot_means(pos, n_boot, rng)
            sens = float(pos.mean())
            denom = sens - float(r.mean())
            with np.errstate(divide="ignore", invalid="ignore"):
                cs = (bg - br) / (bs - br)
            cs = cs[np.isfinite(cs) & (bs - br > 0)]
            out.update({"n_real_positive": int(len(pos)), "sensitivity": sens, "youden_j": denom,
                        "corrected": (float(g.mean() - r.mean()) / denom) if denom > 0 else None,
                        "corrected_ci": ([float(np.quantile(cs, 0.025)), float(np.quantile(cs, 0.975))]
                                         if denom > 0 and len(cs) >= n_boot // 2 else None)})
        else:
            out.update({"n_real_positive": int(len(pos)), "sensitivity": None, "corrected": None, "corrected_ci": None})
    return out


def boot_cluster_means(x: Sequence[float], clusters: Sequence[Any], n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap resamples of the mean of ``x`` resampling whole clusters (e.g. the two images of a
    counterfactual pair, which share their initial noise and can be identical): the ratio of resampled
    cluster sums to resampled cluster sizes."""
    a = _v(x)
    if not len(a):
        return np.full(n_boot, np.nan)
    codes, _ = pd.factorize(pd.Series(list(clusters)), sort=False)
    sums, sizes = np.bincount(codes, weights=a), np.bincount(codes).astype(float)
    counts = rng.multinomial(len(sums), np.full(len(sums), 1 / len(sums)), size=n_boot)
    return (counts @ sums) / (counts @ sizes)


def standardised_excess(generated: Mapping[str, Sequence[float]], real_negatives: Mapping[str, Sequence[float]],
                        real_positives: Mapping[str, Sequence[float]] | None = None, min_n: int = 10,
                        n_boot: int = 2000, seed: int = 0,
                        clusters: Mapping[str, Sequence[Any]] | None = None) -> dict[str, Any]:
    """:func:`excess_rate` within strata of what the images were asked to show, directly standardised to
    the generated images' make-up: ``excess = sum_s w_s (rate_s - real_rate_s)`` with ``w_s`` the share of
    generated images in stratum ``s`` (e.g. prompts asking for pneumonia / not, against real images with /
    without pneumonia). A classifier's false positives depend on what else an image shows (a COVID
    classifier flags more images that show pneumonia), so an unstratified baseline with another make-up
    would call that difference a hallucination. ``corrected`` is the standardised Rogan-Gladen estimate
    ``sum_s w_s (rate_s - fpr_s) / (sens_s - fpr_s)``. ``p`` is the one-sided bootstrap p of excess <= 0.
    ``clusters`` (per stratum, one id per generated image) resamples generated images by cluster: the two
    images of a counterfactual pair share their noise, so they are not independent.
    A stratum without ``min_n`` real negatives (or positives, for the correction) uses all strata's real
    images, and says so (``baseline``)."""
    strata = [str(k) for k, v in generated.items() if len(_v(v))]
    g = {k: _v(generated[k]) for k in strata}
    n = sum(len(x) for x in g.values())
    all_neg = np.concatenate([_v(x) for x in real_negatives.values()]) if real_negatives else np.zeros(0)
    all_pos = (np.concatenate([_v(x) for x in real_positives.values()]) if real_positives else None)
    if n < max(1, int(min_n)) or len(all_neg) < max(1, int(min_n)):
        return {**insufficient(n), "n_real": int(len(all_neg))}
    rng = np.random.default_rng(seed)
    exc = np.zeros(n_boot)
    corr = np.zeros(n_boot)
    est, est_c, rows, ok_c = 0.0, 0.0, {}, all_pos is not None
    for k in strata:
        w = len(g[k]) / n
        r = _v(real_negatives.get(k, []))
        base = "stratum" if len(r) >= min_n else "all strata"
        r = r if len(r) >= min_n else all_neg
        bg = (boot_cluster_means(g[k], clusters[k], n_boot, rng) if clusters is not None
              else boot_means(g[k], n_boot, rng))
        br = boot_means(r, n_boot, rng)
        exc += w * (bg - br)
        est += w * (g[k].mean() - r.mean())
        row = {"weight": w, "n": int(len(g[k])), "rate": float(g[k].mean()), "n_real": int(len(r)),
               "real_rate": float(r.mean()), "baseline": base}
        if ok_c:
            pos = _v((real_positives or {}).get(k, []))
            pos = pos if len(pos) >= min_n else all_pos
            if pos is None or len(pos) < min_n or pos.mean() - r.mean() <= 0:
                ok_c = False
            else:
                bs = boot_means(pos, n_boot, rng)
                with np.errstate(divide="ignore", invalid="ignore"):
                    corr += w * np.where(bs - br > 0, (bg - br) / (bs - br), np.nan)
                est_c += w * (g[k].mean() - r.mean()) / (pos.mean() - r.mean())
                row.update({"n_real_positive": int(len(pos)), "sensitivity": float(pos.mean())})
        rows[k] = row
    g_all = np.concatenate(list(g.values()))
    out: dict[str, Any] = {
        "status": "ok", "n": int(n), "n_real": int(len(all_neg)), "rate": float(g_all.mean()), "rate_ci": rate(g_all)["ci"],
        "real_rate": float(sum(r["weight"] * r["real_rate"] for r in rows.values())),
        "excess": float(est), "excess_ci": [float(np.quantile(exc, 0.025)), float(np.quantile(exc, 0.975))],
        "p": float((1 + np.sum(exc <= 0)) / (1 + n_boot)), "strata": rows}
    if all_pos is not None:
        fin = corr[np.isfinite(corr)]
        out.update({"corrected": float(est_c) if ok_c else None,
                    "corrected_ci": ([float(np.quantile(fin, 0.025)), float(np.quantile(fin, 0.975))]
                                     if ok_c and len(fin) >= n_boot // 2 else None),
                    "sensitivity": float(all_pos.mean()) if len(all_pos) else None})
    return out


def kappa_agreement(flags: Mapping[str, Sequence[float]]) -> dict[str, Any]:
    """Agreement of several classifiers' 0/1 calls on the same images: Cohen's kappa of every pair and
    the share of images on which all agree."""
    from sklearn.metrics import cohen_kappa_score

    names = list(flags)
    arr = np.stack([_v(flags[n]) for n in names]) if names else np.zeros((0, 0))
    pairs = {}
    for a, b in itertools.combinations(range(len(names)), 2):
        x, y = arr[a], arr[b]
        k = cohen_kappa_score(x, y) if len(np.unique(np.concatenate([x, y]))) > 1 else 1.0
        pairs[f"{names[a]}|{names[b]}"] = _f(float(k))
    all_agree = float((arr.min(0) == arr.max(0)).mean()) if arr.size else None
    return {"classifiers": names, "cohen_kappa": pairs, "all_agree": all_agree}


def downstream_gain(baseline: Sequence[Sequence[float]], augmented: Sequence[Sequence[float]], labels: Sequence[int],
                    n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Does adding synthetic images to a classifier's training set help it on real test images?

    ``baseline[k]`` and ``augmented[k]`` are the positive-class probabilities of the k-th pair of
    classifiers (trained alike, same seed, without / with the synthetic images) on the same real images
    (``labels``). Per pair: both AUROCs and accuracies (p >= 0.5) and their differences. Overall: the
    mean difference over pairs with a stratified bootstrap 95 % CI that resamples the *images* (the same
    resample for every pair), and the spread across pairs (their SD: the seed's share of the variation,
    which the image bootstrap does not hold).

    Raises:
        ValueError: no pair, unequal numbers of runs, lengths that differ, or one class missing.
    """
    from sklearn.metrics import roc_auc_score

    if not baseline or len(baseline) != len(augmented):
        raise ValueError(f"downstream: {len(baseline)} baseline and {len(augmented)} augmented classifiers; "
                         "expected pairs (the same number of each, at least one)")
    y = np.asarray(labels).astype(int)
    b = [np.asarray(x, float) for x in baseline]
    g = [np.asarray(x, float) for x in augmented]
    if any(len(x) != len(y) for x in (*b, *g)):
        raise ValueError("downstream: every classifier must score the same real images (lengths differ)")
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if len(pos) < 2 or len(neg) < 2:
        raise ValueError(f"downstream: the real images need both classes (>= 2 each); got {len(pos)} positive, "
                         f"{len(neg)} negative")

    def auc(p: np.ndarray, idx: np.ndarray) -> float:
        return float(roc_auc_score(y[idx], p[idx]))

    def acc(p: np.ndarray, idx: np.ndarray) -> float:
        return float(np.mean((p[idx] >= 0.5) == (y[idx] == 1)))

    every = np.arange(len(y))
    pairs = [{"auroc_baseline": auc(bb, every), "auroc_augmented": auc(gg, every),
              "accuracy_baseline": acc(bb, every), "accuracy_augmented": acc(gg, every)} for bb, gg in zip(b, g)]
    for p in pairs:
        p["auroc_diff"] = p["auroc_augmented"] - p["auroc_baseline"]
        p["accuracy_diff"] = p["accuracy_augmented"] - p["accuracy_baseline"]
    rng = np.random.default_rng(seed)
    boot = {"auroc": [], "accuracy": []}
    for _ in range(int(n_boot)):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        boot["auroc"].append(np.mean([auc(gg, idx) - auc(bb, idx) for bb, gg in zip(b, g)]))
        boot["accuracy"].append(np.mean([acc(gg, idx) - acc(bb, idx) for bb, gg in zip(b, g)]))
    out: dict[str, Any] = {"n_pairs": len(pairs), "n_images": int(len(y)), "n_positive": int(len(pos)), "pairs": pairs,
                           "ci": "stratified bootstrap over the real images (the same resample for every pair)"}
    for m in ("auroc", "accuracy"):
        d = np.array([p[f"{m}_diff"] for p in pairs])
        out[m] = {"baseline": float(np.mean([p[f"{m}_baseline"] for p in pairs])),
                  "augmented": float(np.mean([p[f"{m}_augmented"] for p in pairs])),
                  "diff": float(d.mean()), "diff_sd_across_pairs": float(d.std(ddof=1)) if len(d) > 1 else None,
                  "diff_ci": [float(np.percentile(boot[m], 2.5)), float(np.percentile(boot[m], 97.5))] if n_boot else None}
        out[m]["relative_change"] = out[m]["diff"] / out[m]["baseline"] if out[m]["baseline"] else None
    return out
