"""Label-shift correction of predicted probabilities (Saerens, Latinne & Decaestecker 2002, "Adjusting
the outputs of a classifier to new a priori probabilities: a simple procedure").

When only the class priors change between the data a classifier was calibrated on and the data it
is applied to (p(x | y) fixed), the posteriors on the new data are p'(y | x) ∝ p(y | x) π'(y) / π(y).
The new priors π' are unknown; EM estimates them from the unlabelled predictions alone: E-step adjust
the posteriors with the current π', M-step π' = the mean adjusted posterior, until it stops moving.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def adjust(probs: np.ndarray, source_prior: np.ndarray, target_prior: np.ndarray) -> np.ndarray:
    """Posteriors re-weighted from ``source_prior`` to ``target_prior`` (rows renormalised)."""
    q = np.asarray(probs, dtype=np.float64) * (np.asarray(target_prior) / np.asarray(source_prior))[None]
    return q / q.sum(1, keepdims=True)


def em_priors(probs: np.ndarray, source_prior: np.ndarray, tol: float = 1e-8, max_iter: int = 1000) -> dict[str, Any]:
    """EM estimate of the target priors from N×C calibrated probabilities (no labels).

    Returns:
        ``{"prior": C estimated target priors, "probs": N×C adjusted posteriors, "iterations", "converged"}``.

    Raises:
        ValueError: a source prior that is not a distribution over the C classes with every class > 0.
    """
    p = np.asarray(probs, dtype=np.float64)
    src = np.asarray(source_prior, dtype=np.float64)
    if src.shape != (p.shape[1],) or (src <= 0).any() or not np.isclose(src.sum(), 1):
        raise ValueError(f"label shift: the source prior must give every one of the {p.shape[1]} classes a "
                         f"probability > 0 and sum to 1, got {src.tolist()}")
    pi = src.copy()
    for it in range(1, max_iter + 1):
        q = adjust(p, src, pi)
        new = q.mean(0)
        if np.abs(new - pi).max() < tol:
            pi = new
            return {"prior": pi, "probs": adjust(p, src, pi), "iterations": it, "converged": True}
        pi = new
    return {"prior": pi, "probs": adjust(p, src, pi), "iterations": max_iter, "converged": False}
