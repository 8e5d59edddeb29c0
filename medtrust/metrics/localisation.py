"""Localisation of a heatmap against a ground-truth mask (pure functions on H×W arrays)."""
from __future__ import annotations

import numpy as np


def _check(heatmap: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    h = np.asarray(heatmap, dtype=float)
    m = np.asarray(mask) > 0.5
    if h.shape != m.shape:
        raise ValueError(f"heatmap shape {h.shape} != mask shape {m.shape}")
    if not np.isfinite(h).all() or np.abs(h).max() == 0 or not m.any():
        return None  # undefined: counted by the caller, never averaged in
    return h, m


def pointing_game(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """1.0 if the heatmap's maximum lies inside the mask, else 0.0 (NaN if undefined)."""
    c = _check(heatmap, mask)
    if c is None:
        return float("nan")
    h, m = c
    return float(m.flat[int(np.argmax(h))])


def relevance_mass(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """Share of positive relevance that falls inside the mask (NaN if undefined)."""
    c = _check(heatmap, mask)
    if c is None:
        return float("nan")
    h, m = c
    pos = np.clip(h, 0, None)
    total = pos.sum()
    return float(pos[m].sum() / total) if total > 0 else float("nan")
