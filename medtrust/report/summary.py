"""Flatten an evaluation result (``metrics/<split>.json``) into ``group/name -> float`` scalars."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

COUNTS = ("tp", "fp", "tn", "fn", "n_images", "n_bins")


def scalar_metrics(result: Mapping[str, Any], include_counts: bool = False) -> dict[str, float]:
    """``{"seg/dice": 0.9, "cal/ece_positive": 0.03, ...}`` from the metric groups the result
    declares (``result["metric_groups"]``, written by every task's evaluation). Lists and nested
    values such as reliability bins are left out; pixel counts only with ``include_counts``."""
    out = {}
    for group in result.get("metric_groups") or ():
        for k, v in (result.get(group) or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and (include_counts or k not in COUNTS):
                out[f"{group}/{k}"] = float(v)
    return out
