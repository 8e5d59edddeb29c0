"""Focal loss: gamma 0 is cross-entropy; gamma > 0 discounts easy, correct examples."""
from __future__ import annotations

import pytest
import torch

from medtrust.losses.focal import FocalCrossEntropy


def test_gamma_zero_is_cross_entropy_and_gamma_discounts_easy_examples():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.randint(0, 3, (8,))
    assert FocalCrossEntropy(gamma=0)(x, y).item() == pytest.approx(torch.nn.functional.cross_entropy(x, y).item(), rel=1e-5)
    easy = torch.tensor([[4.0, -4.0]])
    assert FocalCrossEntropy(gamma=2)(easy, torch.tensor([0])) < 0.01 * torch.nn.functional.cross_entropy(easy, torch.tensor([0]))
    with pytest.raises(ValueError, match="loss.gamma"):
        FocalCrossEntropy(gamma=-1)
