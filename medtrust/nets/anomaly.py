"""Networks of SAFEGEN's reconstruction baselines: a convolutional autoencoder from MONAI."""
from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn


def conv_autoencoder(in_channels: int = 1, channels: Sequence[int] = (32, 64, 128), strides: Sequence[int] = (2, 2, 2),
                     latent_channels: int = 8, num_res_units: int = 1, dropout: float | None = None) -> nn.Module:
    """MONAI ``AutoEncoder`` (2D) whose last encoder stage is a stride-1 layer to ``latent_channels``
    channels: the bottleneck (``latent_channels × (H / prod(strides))²`` values) is what keeps it from
    copying its input, anomalies included.

    Raises:
        ValueError: channels and strides of different lengths, or a latent width < 1.
    """
    from monai.networks.nets import AutoEncoder

    if len(channels) != len(strides):
        raise ValueError(f"model.net.channels {list(channels)} and model.net.strides {list(strides)}: expected the "
                         "same length (one stride per encoder level)")
    if int(latent_channels) < 1:
        raise ValueError(f"model.net.latent_channels={latent_channels}: expected >= 1")
    return AutoEncoder(spatial_dims=2, in_channels=int(in_channels), out_channels=int(in_channels),
                       channels=[*map(int, channels), int(latent_channels)], strides=[*map(int, strides), 1],
                       num_res_units=int(num_res_units), dropout=dropout)
