"""Classification task: MC dropout varies and equals T full passes, eval is deterministic, freezing."""
from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn as nn

from medtrust.nets.classifier import EnsembleClassifier, TimmClassifier
from medtrust.tasks.classification import ClassificationTask


def make(net=None, **kw):
    net = net or TimmClassifier("resnet18", num_classes=2, in_chans=1, head_dropout=0.5)
    return ClassificationTask(net, nn.CrossEntropyLoss(), partial(torch.optim.AdamW, lr=1e-3), **kw).eval()


def test_mc_dropout_varies_and_plain_eval_is_deterministic():
    task = make(mc_samples=8)
    x = torch.randn(3, 1, 32, 32)
    mc = task.mc_logits(x)
    assert mc.shape == (8, 3, 2) and mc.std(0).max() > 0
    with torch.no_grad():
        assert torch.equal(task(x), task(x))
    assert not task.net.dropout.training  # MC switched dropout back off


def test_batched_head_mc_equals_t_full_passes_for_the_same_seed():
    task = make(mc_samples=6)
    x = torch.randn(4, 1, 32, 32)
    torch.manual_seed(123)
    batched = task.mc_logits(x, scope="head")
    torch.manual_seed(123)
    naive = task.mc_logits(x, scope="all")  # T full forward passes; only the head has dropout
    assert torch.allclose(batched, naive, atol=1e-5)


def test_ensemble_predict_has_member_axis_and_training_loss_covers_members():
    task = make(EnsembleClassifier(members=2, seed=0, backbone="resnet18", in_chans=1), mc_samples=0)
    x = torch.randn(2, 1, 32, 32)
    out = task.predict_step({"image": x})
    assert out["member_logits"].shape == (2, 2, 2) and "mc_logits" not in out
    task.train()
    loss = task.training_step({"image": x, "label": torch.tensor([0, 1])}, 0)
    loss.backward()
    assert all(m.classifier.weight.grad is not None for m in task.net.members)


def test_freeze_prefixes():
    task = make(freeze=["net.backbone.conv1", "net.backbone.layer1"])
    grads = {n: p.requires_grad for n, p in task.named_parameters()}
    assert not grads["net.backbone.conv1.weight"] and grads["net.backbone.layer4.0.conv1.weight"]
    with pytest.raises(ValueError, match="model.freeze: no parameter starts with 'net.nope'"):
        make(freeze=["net.nope"])


def test_missing_labels_named():
    task = make()
    with pytest.raises(KeyError, match="no 'label'"):
        task.training_step({"image": torch.randn(2, 1, 32, 32)}, 0)
