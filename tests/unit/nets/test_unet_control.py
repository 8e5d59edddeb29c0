"""model=unet: the plain MONAI U-Net control of the Attention U-Net."""
from __future__ import annotations

import pytest
import torch
from monai.networks.nets import AttentionUnet, UNet

from medtrust.nets.unet import attention_unet, plain_unet
from medtrust.xai.perturb import active_dropout_modules


def _params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_same_levels_no_attention_gates_and_mc_dropout_works():
    u, a = plain_unet(3, 1), attention_unet(3, 1)
    assert isinstance(u, UNet) and not isinstance(u, AttentionUnet)
    assert not any("attention" in type(m).__name__.lower() for m in u.modules())
    # same levels: the gates (and their extra convolutions) are most of the difference
    assert 0.7 < _params(u) / _params(a) < 1.0
    x = torch.randn(2, 3, 48, 64)
    assert u(x).shape == (2, 1, 48, 64)
    assert active_dropout_modules(u)                     # pixel MC-dropout uncertainty is defined for it too
    u.eval()
    for m in active_dropout_modules(u):
        m.train()
    assert not torch.equal(u(x), u(x))


def test_plain_unet_shares_the_attention_models_checks():
    with pytest.raises(ValueError, match="cannot be divided by the strides"):
        plain_unet(3, 1, input_size=[50, 64])
    with pytest.raises(ValueError, match="model.net.norm"):
        plain_unet(3, 1, norm="bogus")
    u = plain_unet(1, 1, norm="group", dropout_mode="channel")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in u.modules())
    assert any(isinstance(m, torch.nn.Dropout2d) for m in u.modules())
