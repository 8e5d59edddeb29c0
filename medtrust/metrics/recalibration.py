"""Post-hoc recalibration beyond temperature scaling, through ``netcal`` (Küppers et al. 2020):
histogram binning (Zadrozny & Elkan 2001), isotonic regression (Zadrozny & Elkan 2002) and beta
calibration (Kull et al. 2017). Each is fitted on the calibration split's unscaled probabilities of a
method and applied to any other images' unscaled probabilities of the same method.

Two classes: fitted on the positive-class probability, returned as both columns. More classes: netcal's
one-vs-rest calibration of the N×C matrix, rows renormalised.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

RECALIBRATORS = ("histogram_binning", "isotonic", "beta")


def _make(name: str, bins: int) -> Any:
    from netcal.binning import HistogramBinning, IsotonicRegression
    from netcal.scaling import BetaCalibration

    if name == "histogram_binning":
        return HistogramBinning(bins=int(bins))
    if name == "isotonic":
        return IsotonicRegression()
    if name == "beta":
        return BetaCalibration()
    raise ValueError(f"evaluation.recalibration: unknown method {name!r}; choose from {list(RECALIBRATORS)}")


def _clip(p: np.ndarray) -> np.ndarray:
    return np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)


def fit(probs: np.ndarray, labels: np.ndarray, names: Sequence[str], bins: int = 10) -> dict[str, Any]:
    """Each recalibrator fitted on N×C calibration probabilities and their labels."""
    p, y = _clip(probs), np.asarray(labels, dtype=int)
    out = {}
    for n in names:
        c = _make(str(n), bins)
        c.fit(p[:, 1] if p.shape[1] == 2 else p, y)
        out[str(n)] = c
    return out


def apply(fitted: Mapping[str, Any], probs: np.ndarray) -> dict[str, np.ndarray]:
    """N×C recalibrated probabilities of each fitted recalibrator."""
    p = _clip(probs)
    out = {}
    for n, c in fitted.items():
        if p.shape[1] == 2:
            q = np.clip(np.asarray(c.transform(p[:, 1]), dtype=np.float64).reshape(-1), 0, 1)
            out[n] = np.c_[1 - q, q]
        else:
            q = np.clip(np.asarray(c.transform(p), dtype=np.float64), 1e-12, None)
            out[n] = q / q.sum(1, keepdims=True)
    return out
