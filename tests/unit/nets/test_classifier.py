"""timm classifier and ensemble: grayscale input, dropout head module, refused configurations."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from medtrust.nets.classifier import EnsembleClassifier, TimmClassifier


def test_grayscale_forward_and_head_is_a_dropout_module():
    net = TimmClassifier("resnet18", num_classes=2, in_chans=1, head_dropout=0.5)
    assert net(torch.randn(2, 1, 32, 32)).shape == (2, 2)
    assert isinstance(net.dropout, nn.Dropout) and net.dropout.p == 0.5
    net.eval()
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(net(x), net(x))


def test_unknown_backbone_and_offline_pretrained_name_what_is_missing(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown timm model 'resnet_nope'"):
        TimmClassifier("resnet_nope")
    with pytest.raises(FileNotFoundError, match="pretrained_file not found"):
        TimmClassifier("resnet18", pretrained=True, pretrained_file=str(tmp_path / "w.safetensors"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match="no weights for 'resnet18' were found locally"):
        TimmClassifier("resnet18", pretrained=True)


def test_pretrained_from_a_local_file(tmp_path):
    from safetensors.torch import save_file

    src = TimmClassifier("resnet18", in_chans=3)
    save_file(src.backbone.state_dict(), str(tmp_path / "w.safetensors"))
    net = TimmClassifier("resnet18", in_chans=3, pretrained=True, pretrained_file=str(tmp_path / "w.safetensors"))
    assert torch.equal(net.backbone.conv1.weight, src.backbone.conv1.weight)


def test_ensemble_members_differ_and_stack():
    ens = EnsembleClassifier(members=3, seed=0, backbone="resnet18", in_chans=1)
    x = torch.randn(2, 1, 32, 32)
    ens.eval()
    m = ens.member_logits(x)
    assert m.shape == (3, 2, 2) and not torch.allclose(m[0], m[1])
    assert torch.allclose(torch.softmax(ens(x), -1), torch.softmax(m, -1).mean(0), atol=1e-6)
    with pytest.raises(ValueError, match="members must be >= 2"):
        EnsembleClassifier(members=1)
