"""Our localisation metrics against Quantus (Hedström et al. 2023) on the same heatmaps and masks.

Pointing game, relevance mass and the heatmap AUROC give the same numbers as Quantus's ``PointingGame``,
``RelevanceMassAccuracy`` and ``AUC`` (non-negative maps: Quantus normalises by the maximum, which leaves
these three unchanged; our relevance mass clips negative relevance, Quantus's sums it signed, so signed maps
differ by design). Faithfulness is not compared: ours is the deletion / insertion protocol of Petsiuk et al.
(pixels removed or revealed in order of relevance, area under the class-probability curve), which Quantus
does not implement; its ``RegionPerturbation`` perturbs patches with a different baseline and scale.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medtrust.metrics.localisation import heatmap_auroc, pointing_game, relevance_mass

quantus = pytest.importorskip("quantus")


def _cases(seed: int, n: int = 8, size: int = 24) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    a = rng.uniform(size=(n, 1, size, size)).astype(np.float32)
    s = np.zeros_like(a)
    for i in range(n):
        cy, cx = rng.uniform(6, size - 6, 2)
        s[i, 0] = (yy - cy) ** 2 + (xx - cx) ** 2 <= rng.uniform(9, 36)
        a[i, 0] += rng.uniform(0, 1.5) * s[i, 0]          # from no localisation to strong localisation
    return a, s


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_localisation_metrics_equal_quantus(seed):
    a, s = _cases(seed)
    n, _, h, w = a.shape
    x = np.zeros_like(a)
    y = np.zeros(n, dtype=int)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(h * w, 2)).eval()   # unused by these metrics
    args = dict(model=model, x_batch=x, y_batch=y, a_batch=a, s_batch=s, channel_first=True)
    pg = quantus.PointingGame(disable_warnings=True)(**args)
    rm = quantus.RelevanceMassAccuracy(disable_warnings=True)(**args)
    auc = quantus.AUC(disable_warnings=True)(**args)
    assert [float(v) for v in pg] == [pointing_game(a[i, 0], s[i, 0]) for i in range(n)]
    assert np.allclose(rm, [relevance_mass(a[i, 0], s[i, 0]) for i in range(n)], atol=1e-6)
    assert np.allclose(auc, [heatmap_auroc(a[i, 0], s[i, 0]) for i in range(n)], atol=1e-6)
