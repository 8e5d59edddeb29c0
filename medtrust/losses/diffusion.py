"""The denoising loss of a diffusion model, with optional min-SNR weighting (Hang et al. 2023)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


class DiffusionLoss(nn.Module):
    """Mean squared error between the network output and its target (ε, v or x₀).

    Args:
        snr_gamma: min-SNR-γ weighting of each timestep (None: plain MSE). The weight is
            ``min(SNR, γ) / SNR`` for ε, ``min(SNR, γ) / (SNR + 1)`` for v and ``min(SNR, γ)`` for x₀.
    """

    def __init__(self, snr_gamma: float | None = None) -> None:
        super().__init__()
        self.snr_gamma = float(snr_gamma) if snr_gamma else None

    def forward(self, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor | None = None,
                scheduler: Any = None, weights: torch.Tensor | None = None) -> torch.Tensor:
        """The batch mean of the per-sample losses, each times its ``weights`` entry (B; rating-driven
        fine-tuning) when given."""
        per = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
        if weights is not None:
            if weights.shape != per.shape:
                raise ValueError(f"DiffusionLoss: {tuple(weights.shape)} weights for {tuple(per.shape)} samples")
            per = per * weights.to(per)
        if self.snr_gamma is None or timesteps is None or scheduler is None:
            return per.mean()
        ac = scheduler.alphas_cumprod.to(pred.device)[timesteps].float()
        snr = ac / (1 - ac)
        clipped = snr.clamp(max=self.snr_gamma)
        kind = scheduler.config.prediction_type
        w = clipped / snr if kind == "epsilon" else clipped / (snr + 1) if kind == "v_prediction" else clipped
        return (per * w).mean()


class VAELoss(nn.Module):
    """Reconstruction (L1 or MSE) + ``kl_weight`` × KL of the posterior to N(0, I), per element."""

    def __init__(self, reconstruction: str = "l1", kl_weight: float = 1e-6) -> None:
        super().__init__()
        if reconstruction not in ("l1", "mse"):
            raise ValueError(f"loss.reconstruction={reconstruction!r}; expected l1 or mse")
        self.reconstruction, self.kl_weight = reconstruction, float(kl_weight)

    def forward(self, rec: torch.Tensor, x: torch.Tensor, kl: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        r = (rec - x).abs().mean() if self.reconstruction == "l1" else (rec - x).pow(2).mean()
        k = kl.mean() / max(1, x[0].numel())
        return r + self.kl_weight * k, {"rec": r.detach(), "kl": k.detach()}
