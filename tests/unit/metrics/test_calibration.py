"""Binned calibration equals torchmetrics and the textbook definitions."""
from __future__ import annotations

import pytest
import torch
from torchmetrics.classification import BinaryCalibrationError
from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error
from torchmetrics.utilities import dim_zero_sum

from medtrust.metrics.calibration import (
    BinaryCalibrationMetric,
    calibration_bins,
    compute_binary_ece,
    compute_brier,
    ece_from_bins,
    reliability_from_bins,
)


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
    assert len(rel["confidence"]) == len(rel["frequency"]) == len(rel["count"]) == 10
    assert sum(rel["count"]) == 200000


@pytest.mark.parametrize("n_bins", [1, 2, 10, 15])
def test_exactly_n_bins(n_bins):
    probs = torch.tensor([0.0, 0.3, 0.5, 0.999, 1.0])
    bins = calibration_bins(probs, torch.tensor([0, 1, 0, 1, 1]), n_bins)
    assert bins.shape == (3, n_bins) and bins.dtype == torch.float64
    assert float(bins[0].sum()) == 5 and bins[0, -1] >= 1  # 1.0 is in the last bin
    assert all(len(v) == n_bins for v in reliability_from_bins(bins).values())


@pytest.mark.parametrize("n_bins", [5, 15])
def test_binary_ece_equals_torchmetrics_without_confidence_one(n_bins):
    g = torch.Generator().manual_seed(2)
    probs = torch.rand(4000, generator=g) * 0.999  # never exactly 1.0
    probs[:3] = torch.tensor([0.0, 0.2, 0.4])  # 0 and values on float32 bin edges
    target = (torch.rand(4000, generator=g) < probs.sqrt()).long()
    want = float(binary_calibration_error(probs, target, n_bins=n_bins, norm="l1"))
    assert compute_binary_ece(probs, target, n_bins) == pytest.approx(want, abs=1e-6)
    want_max = float(binary_calibration_error(probs, target, n_bins=n_bins, norm="max"))
    assert ece_from_bins(calibration_bins(probs, target, n_bins))["mce"] == pytest.approx(want_max, abs=1e-6)


def test_multiclass_top_label_ece_equals_torchmetrics():
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(2 * torch.randn(3000, 4, generator=g), 1)
    labels = torch.randint(0, 4, (3000,), generator=g)
    conf, pred = probs.max(1)
    assert float(conf.max()) < 1.0
    got = ece_from_bins(calibration_bins(conf, pred == labels, 15))["ece"]
    want = float(multiclass_calibration_error(probs, labels, num_classes=4, n_bins=15, norm="l1"))
    assert got == pytest.approx(want, abs=1e-6)


def test_confidence_one_lands_in_last_bin():
    probs = torch.tensor([1.0, 1.0, 0.95, 0.05])
    target = torch.tensor([1, 0, 1, 0])
    bins = calibration_bins(probs, target, 10)
    assert bins[0].tolist() == [1, 0, 0, 0, 0, 0, 0, 0, 0, 3]
    # last bin [0.9, 1]: conf (1 + 1 + 0.95) / 3, freq 2/3, mass 3/4; first bin: conf 0.05, freq 0, mass 1/4
    gap = (2.95 / 3 - 2 / 3)
    out = ece_from_bins(bins)
    assert out["ece"] == pytest.approx(0.75 * gap + 0.25 * 0.05)  # = 0.25
    assert out["mce"] == pytest.approx(gap)
    # torchmetrics puts 1.0 in an extra bin: 0.5 * 0.5 + 0.25 * 0.05 + 0.25 * 0.05 = 0.275
    assert float(binary_calibration_error(probs, target, n_bins=10)) == pytest.approx(0.275)


def test_metric_state_is_n_bins_and_sums_across_ranks():
    g = torch.Generator().manual_seed(4)
    probs = torch.rand(1000, generator=g)
    probs[0] = 1.0
    target = (torch.rand(1000, generator=g) < probs).long()
    a, b, both = BinaryCalibrationMetric(8), BinaryCalibrationMetric(8), BinaryCalibrationMetric(8)
    assert a.bins.shape == (3, 8) and a._reductions["bins"] is dim_zero_sum
    a.update(probs[:600], target[:600])
    b.update(probs[600:], target[600:])
    both.update(probs, target)
    a.merge_state(b)  # what a DDP sum of the states gives
    torch.testing.assert_close(a.bins, both.bins)
    assert a.compute() == pytest.approx(both.compute())
    assert set(both.compute()) == {"ece", "mce", "brier"}


def test_bad_inputs():
    with pytest.raises(ValueError, match="n_bins"):
        BinaryCalibrationMetric(0)
    with pytest.raises(ValueError, match="n_bins"):
        calibration_bins(torch.rand(3), torch.ones(3), 0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        calibration_bins(torch.tensor([0.5, 1.01]), torch.ones(2), 10)
    with pytest.raises(ValueError, match="elements"):
        calibration_bins(torch.rand(3), torch.ones(4), 10)
