"""Subgroup metrics and their disparities (fairlearn ``MetricFrame``), with uncertainty on each gap.

Each sensitive attribute (sex, age group, race, or a hidden stratification such as a co-occurring
finding) gets a table of per-group metrics, the largest gap between groups (highest - lowest) and
the ratio (lowest / highest). Groups smaller than ``min_group_size`` are listed but left out of the
gaps: a gap driven by three images is noise, not a disparity.

The gap max - min is never negative, and resampling it (as fairlearn's ``difference_ci`` does) gives
an interval that excludes 0 even when the groups do not differ (measured: sex, no planted effect,
gap 0.06 with a "CI" of [0.007, 0.29]). So each gap gets instead
- ``ci95``: a stratified bootstrap CI of the signed difference between the two groups named
  ``highest`` and ``lowest`` (each group resampled within itself); it contains 0 when that pair is
  not distinguishable at this sample size;
- ``p_value``: a permutation test of "no difference between any groups" (group labels shuffled,
  max - min recomputed), which accounts for picking the extreme pair out of several groups.

Both are scipy's: ``scipy.stats.bootstrap`` (two samples of row indices, ``paired=False``, which
resamples each group within itself; percentile interval) and ``scipy.stats.permutation_test``
(``permutation_type="independent"``, one sample of row indices per group, ``alternative="greater"``),
each drawing from one RNG stream per attribute + metric. Where a metric is undefined (NaN, e.g. a
resampled group without positives):
- CI: undefined resamples are dropped; fewer than ``max(10, n_boot // 2)`` defined ones give
  ``[None, None]`` (as before scipy);
- p-value: a permutation with fewer than two groups where the metric is defined is left out of the
  count. scipy alone would count it as "not more extreme" and keep it in the denominator, so in that
  case the p-value is recounted from scipy's null distribution.
Differences from the hand-written loops these replaced: other random numbers for the same seed (so
other Monte-Carlo values, within Monte-Carlo error); scipy's tie tolerance (relative, 100 machine
epsilons of the observed gap, instead of an absolute 1e-12); an exact test (all distinct
regroupings, no +1) when ``n_boot`` is at least their number (only for tiny groups); and a group of
a single row (possible only with ``min_group_size`` < 2) gets no CI and no p-value, since scipy
needs two rows per sample.
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from fairlearn.metrics import (
    MetricFrame,
    count,
    false_positive_rate,
    selection_rate,
    true_positive_rate,
)
from scipy.stats import permutation_test
from sklearn.metrics import roc_auc_score

from medtrust.metrics.calibration import calibration_bins, ece_from_bins
from medtrust.metrics.stats import bootstrap_interval


def _safe(fn: Callable[..., float]) -> Callable[..., float]:
    """A metric that returns NaN where it is undefined (e.g. no positives in a group)."""

    def wrapped(*args: Any, **kwargs: Any) -> float:
        try:
            v = float(fn(*args, **kwargs))
        except (ValueError, ZeroDivisionError):
            return float("nan")
        return v

    wrapped.__name__ = getattr(fn, "__name__", "metric")
    return wrapped


def _auroc(y_true: np.ndarray, y_pred: np.ndarray, y_score: np.ndarray) -> float:
    if len(np.unique(y_true)) < 2:
        return float("nan")
    return float(roc_auc_score(y_true, y_score))


def _tpr(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(true_positive_rate(y_true, y_pred, pos_label=1)) if (y_true == 1).any() else float("nan")


def _fpr(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(false_positive_rate(y_true, y_pred, pos_label=1)) if (y_true == 0).any() else float("nan")


def _ece(y_true: np.ndarray, y_pred: np.ndarray, confidence: np.ndarray, n_bins: int = 15) -> float:
    import torch

    bins = calibration_bins(torch.as_tensor(confidence, dtype=torch.float64),
                            torch.as_tensor(np.asarray(y_true) == np.asarray(y_pred)), n_bins)
    return float(ece_from_bins(bins)["ece"])


def classification_metric_set(binary: bool) -> dict[str, Callable[..., float]]:
    """The per-group metrics of a classifier: counts, prevalence, accuracy, top-label ECE, and for binary tasks
    AUROC, TPR (equal opportunity), FPR and selection rate (demographic parity)."""
    out: dict[str, Callable[..., float]] = {
        "n": count,
        "prevalence": lambda y, p: float(np.mean(np.asarray(y) == 1)),
        "accuracy": lambda y, p: float(np.mean(np.asarray(y) == np.asarray(p))),
        "ece_top_label": _ece,
    }
    if binary:
        out.update({"auroc": _auroc, "tpr": _tpr, "fpr": _fpr,
                    "selection_rate": lambda y, p: float(selection_rate(y, p, pos_label=1))})
    return {k: _safe(v) for k, v in out.items()}


def subgroup_report(sensitive: pd.DataFrame, y_true: np.ndarray, y_pred: np.ndarray,
                    metrics: Mapping[str, Callable[..., float]], sample_params: Mapping[str, Mapping[str, Any]] | None = None,
                    min_group_size: int = 10, n_boot: int = 200, seed: int = 0) -> dict[str, Any]:
    """Per attribute: groups x metrics, gaps (max - min) and ratios (min / max) over groups with at least
    ``min_group_size`` members, with bootstrap 95 % CIs of the gaps.

    Args:
        sensitive: one column per attribute, one row per image (same order as ``y_true``).
        y_true, y_pred: labels and predicted labels (for segmentation: any per-image arrays the
            metrics read, e.g. per-image Dice in ``y_true`` and zeros in ``y_pred``).
        metrics: name -> ``fn(y_true, y_pred, **params)``; ``n`` (a count) is expected among them.
        sample_params: name -> per-image keyword arrays for that metric (e.g. scores for AUROC).
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    out: dict[str, Any] = {"min_group_size": int(min_group_size), "bootstrap": int(n_boot), "attributes": {}}
    for attr in sensitive.columns:
        groups = sensitive[attr].astype(str).to_numpy()
        sizes = pd.Series(groups).value_counts()
        big = sizes[sizes >= min_group_size].index
        keep = np.isin(groups, big)
        entry: dict[str, Any] = {"groups": {}, "gaps": {}, "small_groups": sorted(sizes[sizes < min_group_size].index.tolist())}
        full = MetricFrame(metrics=dict(metrics), y_true=y_true, y_pred=y_pred, sensitive_features={attr: groups},
                           sample_params=_params(sample_params))
        for g, row in full.by_group.iterrows():
            entry["groups"][str(g)] = {k: (int(v) if k == "n" else _num(v)) for k, v in row.items()}
        if len(big) >= 2:
            by = full.by_group.loc[list(big)].drop(columns=["n"], errors="ignore").astype(float)
            diff, ratio = by.max() - by.min(), by.min() / by.max()  # fairlearn's difference() / ratio()
            members = {str(g): np.flatnonzero(groups == g) for g in big}
            for k in diff.index:
                ok = by[k].notna()
                lo_g = str(by[k][ok].idxmin()) if ok.sum() >= 2 else None
                hi_g = str(by[k][ok].idxmax()) if ok.sum() >= 2 else None
                gap: dict[str, Any] = {"gap": _num(diff[k]) if ok.sum() >= 2 else None, "ratio": _num(ratio[k]),
                                       "lowest": lo_g, "highest": hi_g}
                if n_boot > 0 and lo_g is not None:
                    rng = np.random.default_rng([seed, zlib.crc32(f"{attr}/{k}".encode())])  # per attribute + metric
                    gap["ci95"] = _pair_ci(metrics[k], sample_params, k, y_true, y_pred, members[hi_g],
                                           members[lo_g], n_boot, rng)
                    gap["p_value"] = _permutation_p(metrics[k], sample_params, k, y_true, y_pred, groups, keep,
                                                    gap["gap"], n_boot, rng)
                entry["gaps"][k] = gap
        out["attributes"][attr] = entry
    return out


def _metric_on(fn: Callable[..., float], params: Mapping[str, Mapping[str, Any]] | None, name: str,
               y_true: np.ndarray, y_pred: np.ndarray, idx: np.ndarray) -> float:
    kw = {p: np.asarray(v)[idx] for p, v in ((params or {}).get(name) or {}).items()}
    return float(fn(y_true[idx], y_pred[idx], **kw))


def _pair_ci(fn: Callable[..., float], params: Any, name: str, y_true: np.ndarray, y_pred: np.ndarray,
             hi: np.ndarray, lo: np.ndarray, n_boot: int, rng: np.random.Generator) -> list[float | None]:
    """Percentile 95 % CI of metric(high group) - metric(low group), each group resampled within itself
    (``scipy.stats.bootstrap`` of the two groups' row indices, ``paired=False``). ``[None, None]`` when
    fewer than ``max(10, n_boot // 2)`` resamples are defined or a group has fewer than two rows."""

    def diff(a: np.ndarray, b: np.ndarray) -> float:
        return _metric_on(fn, params, name, y_true, y_pred, a) - _metric_on(fn, params, name, y_true, y_pred, b)

    # percentile, not BCa: BCa's jackknife adds len(hi) + len(lo) evaluations of the difference (3-6x the
    # cost at n_boot=200 and a few hundred images), 200 resamples are too few for BCa's shifted tail
    # quantiles (its 2.5 % point can move to the 1st or 2nd resample) and it needs the full-data
    # metric to be defined; the interval is read for "does it contain 0", where this is enough.
    low, high, _ = bootstrap_interval(diff, (hi, lo), n_boot=n_boot, rng=rng, method="percentile",
                                      min_finite=max(10, n_boot // 2))
    return [low, high] if np.isfinite([low, high]).all() else [None, None]


def _permutation_p(fn: Callable[..., float], params: Any, name: str, y_true: np.ndarray, y_pred: np.ndarray,
                   groups: np.ndarray, keep: np.ndarray, observed: float | None, n_perm: int,
                   rng: np.random.Generator) -> float | None:
    """P(max - min over groups >= observed | group labels exchangeable), with the +1 correction
    (``scipy.stats.permutation_test``, ``permutation_type="independent"``, one sample of row indices
    per group). Permutations where fewer than two groups have a defined metric are left out of the
    count (numerator and denominator); ``None`` if none is defined or a group has fewer than two rows."""
    if observed is None:
        return None
    idx = np.flatnonzero(keep)
    members = [idx[groups[idx] == g] for g in np.unique(groups[idx])]
    if min(len(m) for m in members) < 2:
        return None

    def spread(*samples: np.ndarray) -> float:
        vals = [_metric_on(fn, params, name, y_true, y_pred, m) for m in samples]
        vals = [v for v in vals if np.isfinite(v)]
        return max(vals) - min(vals) if len(vals) >= 2 else float("nan")

    res = permutation_test(members, spread, permutation_type="independent", vectorized=False,
                           n_resamples=n_perm, alternative="greater", rng=rng)
    null = np.asarray(res.null_distribution, dtype=float)
    finite = np.isfinite(null)
    if finite.all():
        return float(res.pvalue)
    if not finite.any():
        return None
    # scipy counts an undefined permutation as "not more extreme" but keeps it in the denominator;
    # recount over the defined ones, with scipy's tolerance and its +1 unless the test was exact
    sizes = np.cumsum([len(m) for m in members])
    exact = n_perm >= math.prod(math.comb(int(n), int(k)) for n, k in zip(sizes[1:], sizes[:-1]))
    adj = 0 if exact else 1
    stat = float(res.statistic)
    hits = int((null[finite] >= stat - abs(100 * np.finfo(float).eps * stat)).sum())
    return float((hits + adj) / (finite.sum() + adj))


def _params(params: Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict[str, Any]] | None:
    if not params:
        return None
    return {m: {k: np.asarray(v) for k, v in p.items()} for m, p in params.items()}


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


def classification_subgroups(df: pd.DataFrame, attrs: Sequence[str], n_classes: int, min_group_size: int = 10,
                             n_boot: int = 200, seed: int = 0) -> dict[str, Any]:
    """Subgroup report from a predictions table (``label``, ``pred``, ``confidence``, ``prob_1``, one
    column per attribute)."""
    binary = n_classes == 2
    params: dict[str, dict[str, Any]] = {"ece_top_label": {"confidence": df["confidence"].to_numpy()}}
    if binary:
        params["auroc"] = {"y_score": df["prob_1"].to_numpy()}
    rep = subgroup_report(df[list(attrs)], df["label"].to_numpy(), df["pred"].to_numpy(),
                          classification_metric_set(binary), params, min_group_size, n_boot, seed)
    rep["positive_class"] = 1 if binary else None
    return rep


def segmentation_subgroups(per_image: pd.DataFrame, attrs: Sequence[str], columns: Sequence[str] = ("dice", "recall"),
                           min_group_size: int = 10, n_boot: int = 200, seed: int = 0) -> dict[str, Any]:
    """Subgroup report of per-image segmentation scores (mean per group; NaN images are left out)."""
    cols = [c for c in columns if c in per_image]
    metrics: dict[str, Callable[..., float]] = {"n": count}
    params: dict[str, dict[str, Any]] = {}
    for c in cols:
        metrics[c] = _safe(lambda y, p, v: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan"))
        params[c] = {"v": per_image[c].to_numpy(dtype=float)}
    zeros = np.zeros(len(per_image))
    return subgroup_report(per_image[list(attrs)], zeros, zeros, metrics, params, min_group_size, n_boot, seed)




def attribute_frame(records: Sequence[Mapping[str, Any]], wanted: Any = "auto") -> pd.DataFrame:
    """One column per sensitive attribute of the records (``record["attrs"]``); missing -> "unknown".

    Args:
        wanted: ``"auto"`` (every attribute any record carries), a list of names, or ``[]``/``None`` (none).

    Raises:
        ValueError: a requested attribute that no record carries (the message lists those that exist).
    """
    present = sorted({k for r in records for k in (r.get("attrs") or {})})
    if wanted in (None, "none") or (not isinstance(wanted, str) and len(list(wanted)) == 0):
        names: list[str] = []
    elif wanted == "auto":
        names = present
    else:
        names = [str(w) for w in ([wanted] if isinstance(wanted, str) else wanted)]
        missing = [n for n in names if n not in present]
        if missing:
            raise ValueError(f"evaluation.subgroups.attributes: {missing} not in the records' attributes "
                           f"(present: {present or 'none'})")
    return pd.DataFrame({n: [str((r.get("attrs") or {}).get(n, "unknown")) for r in records] for n in names},
                        index=range(len(records)))


def write_subgroup_csvs(report: Mapping[str, Any], folder: Any, split: str) -> list[Any]:
    """``<split>_subgroups.csv`` (attribute, group, metrics) and ``<split>_subgroup_gaps.csv``
    (attribute, metric, gap, CI, p-value, lowest / highest group) next to ``metrics/<split>.json``
    (they are also what W&B receives as tables)."""
    from pathlib import Path

    folder = Path(folder)
    groups, gaps = [], []
    for attr, a in report.get("attributes", {}).items():
        groups += [{"attribute": attr, "group": g, "small": g in a.get("small_groups", []), **v}
                   for g, v in a.get("groups", {}).items()]
        for metric, gp in a.get("gaps", {}).items():
            ci = gp.get("ci95") or [None, None]
            gaps.append({"attribute": attr, "metric": metric, "gap": gp.get("gap"), "ci95_low": ci[0],
                         "ci95_high": ci[1], "p_value": gp.get("p_value"), "ratio": gp.get("ratio"),
                         "lowest": gp.get("lowest"), "highest": gp.get("highest")})
    paths = [folder / f"{split}_subgroups.csv", folder / f"{split}_subgroup_gaps.csv"]
    pd.DataFrame(groups).to_csv(paths[0], index=False)
    pd.DataFrame(gaps, columns=["attribute", "metric", "gap", "ci95_low", "ci95_high", "p_value", "ratio", "lowest",
                                "highest"]).to_csv(paths[1], index=False)
    return paths
