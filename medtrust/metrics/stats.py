"""Statistics for reported figures: percentile bootstrap confidence intervals."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def bootstrap_ci(fn: Callable[..., float], *arrays: torch.Tensor, n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of ``fn(*arrays)`` resampling the first axis with replacement.

    Returns:
        ``(low, high)`` at level ``1 - alpha`` (NaN resamples, e.g. one class only, are dropped).
    """
    n = len(arrays[0])
    gen = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(n_boot):
        idx = torch.randint(0, n, (n,), generator=gen)
        v = fn(*(a[idx] for a in arrays))
        if np.isfinite(v):
            vals.append(v)
    if not vals:
        return float("nan"), float("nan")
    lo, hi = np.percentile(vals, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)
