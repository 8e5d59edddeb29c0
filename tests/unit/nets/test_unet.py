"""Attention U-Net factory: shape contract, normalisation choice, refused input sizes."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from medtrust.nets.unet import attention_unet


@pytest.mark.parametrize("norm", ["batch", "instance", "group", "layer"])
def test_forward_shape_and_norm(norm):
    net = attention_unet(3, 1, channels=[4, 8, 16], strides=[2, 2], norm=norm, input_size=[32, 48])
    out = net(torch.randn(2, 3, 32, 48))
    assert out.shape == (2, 1, 32, 48)
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert has_bn == (norm == "batch")


def test_indivisible_input_is_refused_naming_the_divisor():
    with pytest.raises(ValueError, match="multiple of 8"):
        attention_unet(channels=[4, 8, 16, 32], strides=[2, 2, 2], input_size=[64, 60])


@pytest.mark.parametrize("kw,msg", [({"strides": [2]}, "strides"), ({"norm": "weird"}, "norm"),
                                    ({"dropout": 1.0}, "dropout")])
def test_bad_config(kw, msg):
    args = {"channels": [4, 8, 16], "strides": [2, 2], **kw}
    with pytest.raises(ValueError, match=msg):
        attention_unet(**args)


def test_channel_dropout_replaces_every_elementwise_dropout():
    net = attention_unet(channels=[4, 8, 16], strides=[2, 2], dropout=0.2, dropout_mode="channel")
    drops = [m for m in net.modules() if isinstance(m, (nn.Dropout, nn.Dropout2d))]
    assert drops and all(type(m) is nn.Dropout2d and m.p in (0.0, 0.2) for m in drops)  # MONAI sets p=0 in places
    assert sum(m.p == 0.2 for m in drops) > 5
    net.train()
    x = torch.randn(1, 3, 16, 16)
    assert not torch.equal(net(x), net(x))  # still stochastic in training mode
    with pytest.raises(ValueError, match="dropout_mode"):
        attention_unet(channels=[4, 8], strides=[2], dropout_mode="spatial")
