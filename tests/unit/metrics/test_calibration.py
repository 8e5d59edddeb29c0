"""Binned calibration equals torchmetrics and the textbook definitions."""
from __future__ import annotations

import pytest
import torch
from torchmetrics.classification import BinaryCalibrationError

from medtrust.metrics.calibration import BinaryCalibrationMetric, compute_binary_ece, compute_brier


def test_ece_matches_torchmetrics_for_many_batches():
    torch.manual_seed(0)
    probs = torch.rand(5000)
    target = (torch.rand(5000) < probs ** 2).long()  # over-confident on purpose
    ours = BinaryCalibrationMetric(n_bins=15)
    ref = BinaryCalibrationError(n_bins=15, norm="l1")
    for chunk in range(0, 5000, 700):
        ours.update(probs[chunk:chunk + 700], target[chunk:chunk + 700])
        ref.update(probs[chunk:chunk + 700], target[chunk:chunk + 700])
    assert ours.compute()["ece"] == pytest.approx(float(ref.compute()), abs=1e-6)


def test_hand_computed_values():
    probs = torch.tensor([0.1, 0.1, 0.9, 0.9])
    target = torch.tensor([0, 1, 1, 1])
    # 2 bins: [0,0.5) conf 0.1 freq 0.5 ; [0.5,1] conf 0.9 freq 1.0 -> ECE = 0.5*0.4 + 0.5*0.1
    assert compute_binary_ece(probs, target, n_bins=2) == pytest.approx(0.25)
    assert compute_brier(probs, target) == pytest.approx((0.01 + 0.81 + 0.01 + 0.01) / 4)


def test_perfectly_calibrated_is_near_zero_and_reliability_bins():
    torch.manual_seed(1)
    probs = torch.rand(200000)
    target = (torch.rand(200000) < probs).long()
    m = BinaryCalibrationMetric(10)
    m.update(probs, target)
    assert m.compute()["ece"] < 0.01
    rel = m.reliability()
    assert len(rel["confidence"]) == 11 and sum(rel["count"]) == 200000
