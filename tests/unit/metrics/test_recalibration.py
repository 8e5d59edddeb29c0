"""netcal's recalibrators behind medtrust.metrics.recalibration, on known truth."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medtrust.metrics import recalibration as R
from medtrust.metrics.classification import compute_classification_metrics


def _overconfident(rng: np.random.Generator, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += 1.5
    p = np.exp(3 * logits)                       # logits x 3: far too confident
    return p / p.sum(1, keepdims=True), y


@pytest.mark.parametrize("k", [2, 3])
def test_every_recalibrator_repairs_an_overconfident_model(k):
    rng = np.random.default_rng(0)
    pc, yc = _overconfident(rng, 2000, k)
    pt, yt = _overconfident(rng, 4000, k)

    def ece(p):
        return compute_classification_metrics(torch.tensor(p).float(), torch.tensor(yt))["ece_top_label"]

    out = R.apply(R.fit(pc, yc, R.RECALIBRATORS), pt)
    assert set(out) == set(R.RECALIBRATORS)
    for name, q in out.items():
        assert q.shape == pt.shape and np.allclose(q.sum(1), 1)
        assert ece(q) < ece(pt) / 3, name


def test_unknown_recalibrator_is_refused():
    with pytest.raises(ValueError, match="evaluation.recalibration: unknown method 'platt'"):
        R.fit(np.array([[0.4, 0.6]] * 4), np.array([0, 1, 0, 1]), ["platt"])
