"""Statistics for reported figures: bootstrap confidence intervals on ``scipy.stats.bootstrap``.

Resampling is over rows (images): every array passed to :func:`bootstrap_ci` is indexed by the same
resampled row indices, so paired quantities (probabilities and labels) stay together.

Undefined resamples. A resample can make the statistic undefined (NaN), e.g. a resample with one
class only has no AUROC. scipy's BCa interval is then NaN (and so is its percentile interval, which
takes quantiles of a distribution containing NaN). Here, when the requested interval is not finite
but at least ``min_finite`` resamples are, the interval falls back to the *percentile* interval of
the finite resamples (the interval this module computed before it used scipy), and the returned
info says so (``method="percentile"``, ``fallback=<reason>``). The same fallback covers a degenerate
bootstrap distribution (every resample equal, e.g. accuracy 1.0 everywhere), where BCa is undefined
and the percentile interval is the single value. Below ``min_finite`` finite resamples the interval
is ``(nan, nan)``: a CI from a few surviving resamples describes a different population.

Cost of BCa. Besides the ``n_boot`` resamples, BCa's acceleration is a jackknife: the statistic is
evaluated once more per row, ``n`` times in all, each on ``n - 1`` rows, so the cost is
``n_boot + n`` evaluations instead of ``n_boot``. Measured at ``n = 2000``, ``n_boot = 1000`` (2 shared
CPU cores; BCa / percentile / the hand-written loop this replaced): a mean 0.4 / 0.15 / 0.1 s; a
torchmetrics ``binary_auroc`` 2.9 / 1.1 / 0.9 s; sklearn's ``roc_auc_score`` 16 / 4.5 / 4.9 s;
``compute_classification_metrics(...)["auroc"]`` (25 ms a call) 34 / 23 s. Above ``BCA_MAX_N`` rows
``method="BCa"`` is replaced by the percentile interval (said in the info): the jackknife's cost grows
as ``n**2`` for an O(n) statistic, while BCa's correction of the percentile interval shrinks as
``1 / sqrt(n)``.

Differences from the hand-written percentile bootstrap this replaced: BCa by default; the resamples
are drawn from ``np.random.default_rng(seed)`` (not a seeded ``torch.Generator``), so the same seed
gives other (equally valid) bounds; fewer than half defined resamples now give ``(nan, nan)`` (it
used whatever was left, down to one); fewer than two rows give ``(nan, nan)`` (scipy needs two).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from scipy.stats import DegenerateDataWarning, bootstrap

METHODS = ("BCa", "percentile", "basic")
BCA_MAX_N = 2000  # rows; above this BCa's jackknife (n evaluations of the statistic) is replaced by percentile
_BATCH = 256  # resamples (and jackknife rows) per batch: memory O(_BATCH * n) instead of O(max(n_boot, n) * n)


def bootstrap_interval(statistic: Callable[..., float], samples: Sequence[np.ndarray], *, n_boot: int,
                       rng: np.random.Generator, alpha: float = 0.05, method: str = "BCa",
                       min_finite: int | None = None) -> tuple[float, float, dict[str, Any]]:
    """Two-sided ``1 - alpha`` bootstrap CI of ``statistic(*samples)``, each sample resampled within itself.

    A thin layer over ``scipy.stats.bootstrap(..., vectorized=False, paired=False)`` that keeps the
    interval defined when a few resamples are undefined (module docstring).

    Args:
        statistic: ``fn(*resampled_samples) -> float``; NaN where undefined.
        samples: 1-D arrays (usually row indices), each of at least two rows; several samples are
            resampled independently (a stratified bootstrap).
        n_boot: number of resamples.
        rng: the random stream (consumed).
        alpha: 1 - confidence level.
        method: ``"BCa"``, ``"percentile"`` or ``"basic"`` (scipy's names).
        min_finite: fewest finite resamples for a CI; default half of ``n_boot``.

    Returns:
        ``(low, high, info)``; ``info`` has ``method`` (the interval actually computed), ``n_boot``,
        ``n_finite`` (finite resamples) and ``fallback`` (``None`` or why the method differs from the
        requested one, or why the CI is NaN).

    Raises:
        ValueError: an unknown ``method``.
    """
    if method.lower() not in {m.lower() for m in METHODS}:
        raise ValueError(f"bootstrap method {method!r} is not one of {METHODS}")
    method = next(m for m in METHODS if m.lower() == method.lower())
    info: dict[str, Any] = {"method": method, "n_boot": int(n_boot), "n_finite": 0, "fallback": None}
    if n_boot <= 0 or min(len(s) for s in samples) < 2:
        info["fallback"] = "no resamples" if n_boot <= 0 else "a sample has fewer than two rows"
        return float("nan"), float("nan"), info
    need = math.ceil(n_boot / 2) if min_finite is None else int(min_finite)
    with warnings.catch_warnings():
        # NaN resamples / a degenerate distribution: handled below, from the bootstrap distribution
        warnings.simplefilter("ignore", DegenerateDataWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        res = bootstrap(tuple(samples), statistic, n_resamples=int(n_boot), confidence_level=1 - alpha,
                        method=method, vectorized=False, paired=False, batch=_BATCH, rng=rng)
    dist = np.asarray(res.bootstrap_distribution, dtype=float)
    finite = np.isfinite(dist)
    info["n_finite"] = int(finite.sum())
    if finite.sum() < need:
        info["fallback"] = f"only {int(finite.sum())} of {n_boot} resamples defined (< {need})"
        return float("nan"), float("nan"), info
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if finite.all() and np.isfinite([lo, hi]).all():
        return lo, hi, info
    undefined = int((~finite).sum())
    info["fallback"] = (f"{method} undefined ({undefined} undefined resamples)" if undefined else
                        f"{method} undefined (degenerate bootstrap distribution or jackknife)")
    info["method"] = "percentile"
    q = np.percentile(dist[finite], [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(q[0]), float(q[1]), info


def bootstrap_ci(fn: Callable[..., float], *arrays: torch.Tensor | np.ndarray, n_boot: int = 1000,
                 alpha: float = 0.05, seed: int = 0, method: str = "BCa",
                 return_info: bool = False) -> tuple[float, float] | tuple[float, float, dict[str, Any]]:
    """Bootstrap CI of ``fn(*arrays)``, resampling rows (the first axis) of all arrays together.

    BCa by default (Efron 1987, "Better bootstrap confidence intervals", JASA 82:171), through
    ``scipy.stats.bootstrap`` over one array of row indices; ``rng = np.random.default_rng(seed)``.
    See the module docstring for undefined resamples and the cost of BCa (above ``BCA_MAX_N`` rows
    BCa is replaced by the percentile interval).

    Args:
        fn: statistic of the resampled arrays, returning a float (NaN where undefined).
        arrays: tensors or arrays with the same first dimension N.
        n_boot: number of resamples.
        alpha: 1 - confidence level.
        seed: seed of the resampling stream.
        method: ``"BCa"``, ``"percentile"`` or ``"basic"``.
        return_info: also return the info dict of :func:`bootstrap_interval`.

    Returns:
        ``(low, high)`` at level ``1 - alpha`` (``(nan, nan)`` if fewer than half the resamples are
        defined), or ``(low, high, info)``.

    Raises:
        ValueError: an unknown ``method``.
    """
    n = len(arrays[0])
    requested = method
    if method.lower() == "bca" and n > BCA_MAX_N:
        method = "percentile"

    def statistic(i: np.ndarray) -> float:
        return float(fn(*(a[torch.from_numpy(i)] if isinstance(a, torch.Tensor) else a[i] for a in arrays)))

    lo, hi, info = bootstrap_interval(statistic, (np.arange(n),), n_boot=n_boot, alpha=alpha, method=method,
                                      rng=np.random.default_rng(seed))
    if method != requested:
        note = f"BCa replaced by percentile above {BCA_MAX_N} rows (jackknife cost)"
        info["fallback"] = note if info["fallback"] is None else f"{note}; {info['fallback']}"
    return (lo, hi, info) if return_info else (lo, hi)


def bootstrap_mean_ci(values: torch.Tensor | np.ndarray | Sequence[float], n_boot: int = 1000, alpha: float = 0.05,
                      seed: int = 0, method: str = "BCa",
                      return_info: bool = False) -> tuple[float, float] | tuple[float, float, dict[str, Any]]:
    """Bootstrap CI of the mean of per-image values (e.g. Dice), NaN entries ignored.

    The NaN entries are dropped *before* resampling, so this is the CI of the mean over the images
    where the value is defined (the same number of them in every resample); the statistic is then
    never undefined. Built on :func:`bootstrap_ci` (same arguments and returns).
    """
    v = values.detach().cpu().double().numpy() if isinstance(values, torch.Tensor) else np.asarray(values, float)
    v = v.ravel()
    return bootstrap_ci(lambda x: float(x.mean()), v[np.isfinite(v)], n_boot=n_boot, alpha=alpha, seed=seed,
                        method=method, return_info=return_info)
