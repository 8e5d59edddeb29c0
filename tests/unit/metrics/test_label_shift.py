"""EM re-estimation of class priors (Saerens et al. 2002) on known truth."""
from __future__ import annotations

import numpy as np
import pytest

from medtrust.metrics.label_shift import adjust, em_priors


def _calibrated(rng: np.random.Generator, n: int, prior: float) -> tuple[np.ndarray, np.ndarray]:
    """Two Gaussian classes (means -1, +1, SD 1); probabilities exact under a 50/50 source prior."""
    y = (rng.uniform(size=n) < prior).astype(int)
    x = rng.normal(np.where(y == 1, 1.0, -1.0), 1.0)
    p1 = 1 / (1 + np.exp(-2 * x))                  # the Bayes posterior at prior 0.5
    return np.c_[1 - p1, p1], y


@pytest.mark.parametrize("target", [0.2, 0.5, 0.8])
def test_em_recovers_the_target_prior_and_improves_calibration(target):
    rng = np.random.default_rng(0)
    p, y = _calibrated(rng, 20_000, target)
    em = em_priors(p, np.array([0.5, 0.5]))
    assert em["converged"] and em["prior"][1] == pytest.approx(target, abs=0.02)

    def nll(q):
        return float(-np.log(q[np.arange(len(y)), y]).mean())

    if target != 0.5:
        assert nll(em["probs"]) < nll(p) - 0.03      # the posteriors were for the wrong priors; EM fixes them
    else:
        assert nll(em["probs"]) == pytest.approx(nll(p), abs=0.005)
    assert np.allclose(em["probs"].sum(1), 1)


def test_adjust_is_bayes_rule_and_bad_priors_are_refused():
    p = np.array([[0.5, 0.5]])
    assert np.allclose(adjust(p, np.array([0.5, 0.5]), np.array([0.2, 0.8])), [[0.2, 0.8]])
    with pytest.raises(ValueError, match="every one of the 2 classes a probability > 0"):
        em_priors(p, np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="sum to 1"):
        em_priors(p, np.array([0.3, 0.3]))
