"""Focal loss for class-index targets (Lin et al., 2017), from MONAI's ``FocalLoss``."""
from __future__ import annotations

import torch
import torch.nn as nn
from monai.losses import FocalLoss


class FocalCrossEntropy(nn.Module):
    """Multi-class focal loss on logits B×C and integer labels B (MONAI ``FocalLoss`` with
    softmax and one-hot targets). Down-weights easy examples, which counteracts the over-confidence
    plain cross-entropy drives (Mukhoti et al., 2020).

    Args:
        gamma: focusing parameter (0 = cross-entropy).
        alpha: optional weight of the positive class (binary), as in MONAI.
    """

    def __init__(self, gamma: float = 2.0, alpha: float | None = None) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"loss.gamma must be >= 0, got {gamma}")
        self.focal = FocalLoss(gamma=gamma, alpha=alpha, use_softmax=True, to_onehot_y=True, reduction="mean")

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # MONAI sums over classes before the mean over samples; multiply by C to keep that sum
        return self.focal(logits, labels.long()[:, None]) * logits.shape[1]
