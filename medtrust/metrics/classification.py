"""Classification, calibration and selective-prediction metrics on predicted probabilities.

Discrimination (AUROC, PR-AUC, accuracy, F1) comes from torchmetrics. Two calibration errors, named
apart because they measure different things:

- ``ece_top_label``: confidence of the predicted class against accuracy (Guo et al., 2017),
  equal-width bins (equals torchmetrics' ``MulticlassCalibrationError``; tested); and
  ``ece_top_label_adaptive`` with equal-mass bins (Nixon et al., 2019). Defined for any C.
- ``ece_positive`` (binary tasks only): the positive-class probability against the observed
  frequency of positives (the reliability diagram of a risk score; what the calibration callback
  logs as ``cal/ece_positive``).
``brier`` is the binary Brier score (p1 - y)^2 for two classes and the multi-class sum otherwise;
``nll`` the mean negative log-likelihood; ``aurc`` the area under the risk-coverage curve.
"""
from __future__ import annotations

from typing import Any

import torch
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    multiclass_auroc,
    multiclass_average_precision,
)

from medtrust.metrics.calibration import calibration_bins, ece_from_bins, reliability_from_bins


def adaptive_ece(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = 15) -> float:
    """ECE with equal-mass bins: sort by confidence, split into ``n_bins`` groups of (almost) equal
    size, weight each |mean confidence - accuracy| by its size."""
    conf, acc = confidence.double().reshape(-1), correct.double().reshape(-1)
    order = conf.argsort()
    total = 0.0
    for chunk in torch.tensor_split(order, min(n_bins, len(order))):
        if len(chunk):
            total += len(chunk) * abs(float(conf[chunk].mean() - acc[chunk].mean()))
    return total / max(len(conf), 1)


def risk_coverage(confidence: torch.Tensor, correct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Selective prediction: keep the k most confident samples, k = 1..N.

    Returns:
        ``(coverage, risk)`` of length N (risk = error rate among the kept samples).
    """
    order = confidence.argsort(descending=True, stable=True)
    errors = (~correct.bool()[order]).double().cumsum(0)
    k = torch.arange(1, len(order) + 1, dtype=torch.float64)
    return k / len(order), errors / k


def aurc(confidence: torch.Tensor, correct: torch.Tensor) -> float:
    """Area under the risk-coverage curve (mean selective risk over all coverages; lower is better)."""
    return float(risk_coverage(confidence, correct)[1].mean())


def compute_classification_metrics(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> dict[str, Any]:
    """All scalar metrics plus reliability bins for N×C probabilities and N integer labels."""
    probs, labels = probs.double(), labels.long()
    n, c = probs.shape
    conf, pred = probs.max(1)
    correct = pred == labels
    if c == 2:
        auroc = float(binary_auroc(probs[:, 1].float(), labels)) if labels.unique().numel() == 2 else float("nan")
        ap = float(binary_average_precision(probs[:, 1].float(), labels)) if labels.any() else float("nan")
        brier = float(((probs[:, 1] - labels.double()) ** 2).mean())
        tp = float(((pred == 1) & (labels == 1)).sum())
        f1 = 2 * tp / max(float((pred == 1).sum() + (labels == 1).sum()), 1.0)
    else:
        auroc = float(multiclass_auroc(probs.float(), labels, num_classes=c))
        ap = float(multiclass_average_precision(probs.float(), labels, num_classes=c))
        onehot = torch.nn.functional.one_hot(labels, c).double()
        brier = float(((probs - onehot) ** 2).sum(1).mean())
        f1s = []
        for k in range(c):
            tp = float(((pred == k) & (labels == k)).sum())
            f1s.append(2 * tp / max(float((pred == k).sum() + (labels == k).sum()), 1.0))
        f1 = sum(f1s) / c
    bins = calibration_bins(conf, correct, n_bins)
    nll = float(-torch.log(probs[torch.arange(n), labels].clamp_min(1e-12)).mean())
    out = {
        "auroc": auroc, "accuracy": float(correct.double().mean()), "f1": f1, "pr_auc": ap,
        "ece_top_label": ece_from_bins(bins)["ece"], "ece_top_label_adaptive": adaptive_ece(conf, correct, n_bins),
        "brier": brier, "nll": nll, "aurc": aurc(conf, correct), "n_images": n,
        "reliability": reliability_from_bins(bins),
    }
    if c == 2:
        out["ece_positive"] = ece_from_bins(calibration_bins(probs[:, 1], labels, n_bins))["ece"]
    return out


def predictive_uncertainty(sample_probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Uncertainty from S×N×C sampled probabilities (MC dropout passes or ensemble members).

    Returns:
        ``mean`` N×C, ``entropy`` (predictive, total), ``expected_entropy`` (aleatoric part),
        ``mutual_information`` (epistemic = entropy - expected entropy) and ``variance`` (of the
        predicted class's probability across samples), each N.
    """
    p = sample_probs.double().clamp_min(1e-12)
    mean = p.mean(0)
    entropy = -(mean * mean.log()).sum(-1)
    expected = -(p * p.log()).sum(-1).mean(0)
    pred = mean.argmax(-1)
    var = p[:, torch.arange(p.shape[1]), pred].var(0, unbiased=False)
    return {"mean": mean, "entropy": entropy, "expected_entropy": expected,
            "mutual_information": (entropy - expected).clamp_min(0), "variance": var}


def fit_temperature(sample_logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 200) -> float:
    """Temperature scaling (Guo et al., 2017): one T > 0 minimising the NLL of
    ``mean_s softmax(logits_s / T)`` on held-out data, by LBFGS on log T.

    Args:
        sample_logits: S×N×C (S = 1 for a deterministic model).
        labels: N integer labels.
    """
    logits = sample_logits.detach().double().clone()  # clone: inputs may be inference-mode tensors
    labels = labels.long().clone()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        p = torch.softmax(logits / log_t.exp(), -1).mean(0)
        loss = -torch.log(p[torch.arange(len(labels)), labels].clamp_min(1e-12)).mean()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return float(log_t.detach().exp().clamp(1e-2, 1e2))
