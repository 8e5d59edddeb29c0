"""Attention U-Net (Oktay et al., 2018) from MONAI, with input-size and normalisation checks."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn as nn
from monai.networks.nets import AttentionUnet

NORMS = ("batch", "instance", "group", "layer")


def _make_norm(kind: str, channels: int, groups: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(math.gcd(groups, channels), channels)
    if kind == "layer":  # layer norm over (C, H, W) of each sample, as GlassBox uses
        return nn.GroupNorm(1, channels)
    raise ValueError(kind)


def replace_batchnorm(module: nn.Module, kind: str, groups: int = 8) -> int:
    """Swap every ``BatchNorm2d`` in ``module`` for the ``kind`` normalisation, in place.

    Returns:
        How many layers were replaced.
    """
    n = 0
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, _make_norm(kind, child.num_features, groups))
            n += 1
        else:
            n += replace_batchnorm(child, kind, groups)
    return n


def use_channel_dropout(module: nn.Module) -> int:
    """Swap every element-wise ``nn.Dropout`` for ``nn.Dropout2d`` (whole feature maps), in place.

    This is what MONAI's ``ADN(dropout_dim=2)`` builds; ``AttentionUnet`` does not expose the
    option. On CPU, element-wise dropout draws one Bernoulli number per activation and costs about
    17 % of an Attention U-Net training step here; channel dropout draws one per feature map (see
    ``experiments/benchmark.py``). Both stay ``nn`` modules, so MC dropout can switch them on.

    Returns:
        How many layers were replaced.
    """
    n = 0
    for name, child in module.named_children():
        if type(child) is nn.Dropout:
            setattr(module, name, nn.Dropout2d(child.p))
            n += 1
        else:
            n += use_channel_dropout(child)
    return n


def attention_unet(
    in_channels: int = 3,
    out_channels: int = 1,
    channels: Sequence[int] = (16, 32, 64, 128),
    strides: Sequence[int] = (2, 2, 2),
    dropout: float = 0.1,
    dropout_mode: str = "element",
    norm: str = "batch",
    norm_groups: int = 8,
    kernel_size: int = 3,
    up_kernel_size: int = 3,
    input_size: int | Sequence[int] | None = None,
) -> AttentionUnet:
    """Build MONAI's 2-D ``AttentionUnet`` after checking the configuration.

    Args:
        in_channels: image channels.
        out_channels: output channels (1 = binary logits).
        channels: feature channels per level.
        strides: down-sampling stride between levels (``len(channels) - 1`` values).
        dropout: dropout in every convolution block.
        dropout_mode: ``element`` (``nn.Dropout``, MONAI's default) or ``channel``
            (``nn.Dropout2d``: drops whole feature maps; much cheaper on CPU).
        norm: ``batch`` (MONAI's default), ``instance``, ``group`` or ``layer``.
        norm_groups: groups for ``norm=group``.
        kernel_size, up_kernel_size: convolution kernel sizes.
        input_size: (H, W) the model will see; each side must be divisible by ``prod(strides)``.

    Returns:
        The network; it maps B×C×H×W to B×out×H×W logits.

    Raises:
        ValueError: strides/channels mismatch, bad norm, or an input size the strides cannot divide.
    """
    channels, strides = _check(channels, strides, dropout, dropout_mode, norm, input_size)
    net = AttentionUnet(spatial_dims=2, in_channels=in_channels, out_channels=out_channels, channels=channels,
                        strides=strides, kernel_size=kernel_size, up_kernel_size=up_kernel_size, dropout=dropout)
    return _finish(net, norm, norm_groups, dropout_mode)


def _check(channels: Sequence[int], strides: Sequence[int], dropout: float, dropout_mode: str, norm: str,
           input_size: int | Sequence[int] | None) -> tuple[list[int], list[int]]:
    channels, strides = [int(c) for c in channels], [int(s) for s in strides]
    if len(strides) != len(channels) - 1:
        raise ValueError(f"model.net.strides needs len(channels)-1 = {len(channels) - 1} values, got {strides}")
    if norm not in NORMS:
        raise ValueError(f"model.net.norm must be one of {NORMS}, got {norm!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"model.net.dropout must be in [0, 1), got {dropout}")
    if dropout_mode not in ("element", "channel"):
        raise ValueError(f"model.net.dropout_mode must be 'element' or 'channel', got {dropout_mode!r}")
    divisor = math.prod(strides)
    if input_size is not None:
        size = [int(input_size)] * 2 if isinstance(input_size, int) else [int(s) for s in input_size]
        bad = [s for s in size if s % divisor]
        if bad:
            raise ValueError(
                f"input size {size} cannot be divided by the strides {strides}: every side must be a multiple "
                f"of {divisor} (= product of model.net.strides); change data.image_size or the strides"
            )
    return channels, strides


def _finish(net: nn.Module, norm: str, norm_groups: int, dropout_mode: str) -> nn.Module:
    if norm != "batch":
        replace_batchnorm(net, norm, norm_groups)
    if dropout_mode == "channel":
        use_channel_dropout(net)
    return net


def plain_unet(
    in_channels: int = 3,
    out_channels: int = 1,
    channels: Sequence[int] = (16, 32, 64, 128),
    strides: Sequence[int] = (2, 2, 2),
    dropout: float = 0.1,
    dropout_mode: str = "element",
    norm: str = "batch",
    norm_groups: int = 8,
    kernel_size: int = 3,
    up_kernel_size: int = 3,
    num_res_units: int = 2,
    input_size: int | Sequence[int] | None = None,
) -> nn.Module:
    """MONAI's plain 2-D ``UNet`` with the Attention U-Net's levels, strides, kernels, dropout and
    normalisation (the same checks): the control that measures what the attention gates add
    (``model=unet``). ``num_res_units=2`` gives each level two convolutions, like the attention
    model's blocks; the parameter counts are compared in ``tests/unit/nets``."""
    from monai.networks.nets import UNet

    channels, strides = _check(channels, strides, dropout, dropout_mode, norm, input_size)
    net = UNet(spatial_dims=2, in_channels=in_channels, out_channels=out_channels, channels=channels, strides=strides,
               kernel_size=kernel_size, up_kernel_size=up_kernel_size, num_res_units=int(num_res_units),
               dropout=dropout, norm="batch")
    return _finish(net, norm, norm_groups, dropout_mode)
