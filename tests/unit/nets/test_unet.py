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
