"""Losses: the hybrid is the weighted sum of MONAI's; Tversky with alpha = beta = 0.5 is Dice."""
from __future__ import annotations

import pytest
import torch
from monai.losses import DiceLoss, TverskyLoss

from medtrust.losses.hybrid import DiceTverskyLoss


@pytest.fixture
def batch():
    torch.manual_seed(0)
    return torch.randn(3, 1, 16, 16), (torch.rand(3, 1, 16, 16) > 0.7).float()


def test_hybrid_is_weighted_sum(batch):
    logits, target = batch
    loss = DiceTverskyLoss(lambda_dice=0.3, lambda_tversky=0.7, alpha=0.2, beta=0.8)
    want = 0.3 * DiceLoss(sigmoid=True, batch=True)(logits, target) + \
        0.7 * TverskyLoss(sigmoid=True, alpha=0.2, beta=0.8, batch=True)(logits, target)
    assert loss(logits, target).item() == pytest.approx(want.item(), rel=1e-6)


def test_tversky_half_half_equals_dice(batch):
    logits, target = batch
    d = DiceLoss(sigmoid=True)(logits, target)
    tv = TverskyLoss(sigmoid=True, alpha=0.5, beta=0.5)(logits, target)
    assert tv.item() == pytest.approx(d.item(), rel=1e-6)


def test_tversky_beta_gt_alpha_penalises_misses_more():
    target = torch.zeros(1, 1, 8, 8)
    target[..., :4, :] = 1
    under = torch.full_like(target, -10.0)
    under[..., :2, :] = 10  # misses half the lesion (false negatives)
    over = torch.full_like(target, -10.0)
    over[..., :6, :] = 10  # covers it plus as many false positives
    tv = TverskyLoss(sigmoid=True, alpha=0.3, beta=0.7)
    assert tv(under, target) > tv(over, target)


def test_bad_weights():
    with pytest.raises(ValueError, match="lambda_dice"):
        DiceTverskyLoss(lambda_dice=0, lambda_tversky=0)
    with pytest.raises(ValueError, match="lambda_dice"):
        DiceTverskyLoss(lambda_dice=-1)
