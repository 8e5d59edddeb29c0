"""Classification, calibration, selective-prediction and uncertainty metrics against references."""
from __future__ import annotations

import pytest
import torch
from torchmetrics.classification import MulticlassCalibrationError, BinaryCalibrationError

from medtrust.metrics.classification import (
    adaptive_ece,
    aurc,
    compute_classification_metrics,
    fit_temperature,
    predictive_uncertainty,
    risk_coverage,
)
from medtrust.metrics.stats import bootstrap_ci


def test_top_label_ece_matches_torchmetrics():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(2000, 2) * 2, -1)
    labels = (torch.rand(2000) < probs[:, 1] ** 1.5).long()
    ref = MulticlassCalibrationError(num_classes=2, n_bins=15, norm="l1")(probs, labels)
    m = compute_classification_metrics(probs, labels)
    assert m["ece_top_label"] == pytest.approx(float(ref), abs=1e-6)
    # positive-class ECE is another quantity (probability of class 1 vs frequency of positives)
    ref_pos = BinaryCalibrationError(n_bins=15, norm="l1")(probs[:, 1], labels)
    assert m["ece_positive"] == pytest.approx(float(ref_pos), abs=1e-6) and m["ece_positive"] != m["ece_top_label"]


def test_adaptive_ece_hand_computed():
    conf = torch.tensor([0.6, 0.7, 0.8, 0.9])
    correct = torch.tensor([1, 0, 1, 1])
    # 2 equal-mass bins: {0.6, 0.7} conf .65 acc .5 ; {0.8, 0.9} conf .85 acc 1 -> (2*.15 + 2*.15)/4
    assert adaptive_ece(conf, correct, n_bins=2) == pytest.approx(0.15)


def test_risk_coverage_and_aurc_hand_computed():
    conf = torch.tensor([0.9, 0.8, 0.7, 0.6])
    correct = torch.tensor([True, False, True, True])
    cov, risk = risk_coverage(conf, correct)
    assert cov.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert risk.tolist() == pytest.approx([0.0, 0.5, 1 / 3, 0.25])
    assert aurc(conf, correct) == pytest.approx((0 + 0.5 + 1 / 3 + 0.25) / 4)


def test_binary_metrics_hand_computed():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.7, 0.3]])
    labels = torch.tensor([0, 1, 0, 1])
    m = compute_classification_metrics(probs, labels, n_bins=10)
    assert m["accuracy"] == 0.5 and m["auroc"] == pytest.approx(0.75)
    assert m["brier"] == pytest.approx((0.01 + 0.04 + 0.36 + 0.49) / 4)
    assert m["nll"] == pytest.approx(-(torch.log(torch.tensor([0.9, 0.8, 0.4, 0.3]))).mean().item(), rel=1e-6)
    assert m["f1"] == pytest.approx(0.5)


def test_uncertainty_decomposition():
    same = torch.tensor([[[0.7, 0.3]]]).repeat(5, 1, 1)
    u = predictive_uncertainty(same)
    assert u["mutual_information"].item() == pytest.approx(0.0, abs=1e-9) and u["variance"].item() == pytest.approx(0.0)
    split = torch.tensor([[[0.99, 0.01]], [[0.01, 0.99]]])
    u = predictive_uncertainty(split)
    assert u["entropy"].item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), rel=1e-6)
    assert u["mutual_information"].item() > 0.6  # disagreement = epistemic


def test_temperature_scaling_recovers_a_known_temperature():
    torch.manual_seed(0)
    z = torch.randn(20000, 3) * 3
    labels = torch.multinomial(torch.softmax(z / 2.0, -1), 1)[:, 0]
    assert fit_temperature(z[None], labels) == pytest.approx(2.0, rel=0.05)


def test_bootstrap_ci_brackets_the_estimate():
    torch.manual_seed(0)
    x = torch.randn(500) + 1
    lo, hi = bootstrap_ci(lambda a: float(a.mean()), x, n_boot=300)
    assert lo < float(x.mean()) < hi and hi - lo < 0.3


def test_quadrant_threshold_is_the_lowest_reaching_the_target_accuracy():
    from medtrust.evaluation.classification import choose_quadrant_threshold

    conf = torch.tensor([0.99, 0.95, 0.9, 0.8, 0.7, 0.6])
    correct = torch.tensor([True, True, True, False, True, False])
    assert choose_quadrant_threshold(conf, correct, 1.0) == pytest.approx(0.9)
    assert choose_quadrant_threshold(conf, correct, 0.8) == pytest.approx(0.7)  # 4/5 correct down to 0.7
    assert choose_quadrant_threshold(conf, ~correct, 0.99) == pytest.approx(float(conf.median()))  # fallback


def test_calibration_split_choice():
    from medtrust.evaluation.classification import calibration_split

    class DM:
        def __init__(self, splits):
            self.splits = splits

        def has_split(self, s):
            return s in self.splits

    assert calibration_split(DM({"train", "val"}), "auto") == "val"
    assert calibration_split(DM({"train", "val", "cal"}), "auto") == "cal"
    assert calibration_split(DM({"train", "val", "cal"}), "val") == "val"
    with pytest.raises(ValueError, match="calibration_fraction"):
        calibration_split(DM({"train", "val"}), "cal")
    with pytest.raises(ValueError, match="evaluation.calibration_split"):
        calibration_split(DM({"val"}), "test")
