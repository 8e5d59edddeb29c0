"""Weighted Dice + Tversky loss (the GlassBox "balanced" variant)."""
from __future__ import annotations

import torch
import torch.nn as nn
from monai.losses import DiceLoss, TverskyLoss


class DiceTverskyLoss(nn.Module):
    """``lambda_dice * Dice + lambda_tversky * Tversky`` from MONAI's own losses.

    Tversky (Salehi et al., 2017) weights false positives by ``alpha`` and false negatives by
    ``beta``; ``alpha = beta = 0.5`` is exactly Dice. Mixing the two trades precision for recall
    more gently than Tversky alone.

    Args:
        lambda_dice: weight of the Dice term (>= 0).
        lambda_tversky: weight of the Tversky term (>= 0); the two cannot both be 0.
        alpha: Tversky false-positive weight.
        beta: Tversky false-negative weight.
        sigmoid: apply a sigmoid to the input logits.
        batch: compute the ratios over the whole batch (more stable with small lesions).
        smooth_nr, smooth_dr: MONAI smoothing terms.

    Raises:
        ValueError: negative weights or both zero.
    """

    def __init__(self, lambda_dice: float = 0.5, lambda_tversky: float = 0.5, alpha: float = 0.3, beta: float = 0.7,
                 sigmoid: bool = True, batch: bool = True, smooth_nr: float = 1e-5, smooth_dr: float = 1e-5) -> None:
        super().__init__()
        if lambda_dice < 0 or lambda_tversky < 0 or lambda_dice + lambda_tversky == 0:
            raise ValueError(f"loss.lambda_dice and loss.lambda_tversky must be >= 0 and not both 0, "
                             f"got {lambda_dice}, {lambda_tversky}")
        self.lambda_dice, self.lambda_tversky = float(lambda_dice), float(lambda_tversky)
        self.dice = DiceLoss(sigmoid=sigmoid, batch=batch, smooth_nr=smooth_nr, smooth_dr=smooth_dr)
        self.tversky = TverskyLoss(sigmoid=sigmoid, alpha=alpha, beta=beta, batch=batch,
                                   smooth_nr=smooth_nr, smooth_dr=smooth_dr)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Args: input logits B×1×H×W; target B×1×H×W in {0,1}. Returns: scalar loss."""
        return self.lambda_dice * self.dice(input, target) + self.lambda_tversky * self.tversky(input, target)
