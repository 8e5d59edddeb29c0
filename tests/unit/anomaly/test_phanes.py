"""The PHANES-style baseline: the coarse flag, the fill from context, and the RePaint-style inpainting,
checked with an oracle denoiser that knows the clean image."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from medtrust.anomaly.phanes import coarse_mask, context_fill, inpaint
from tests.unit.anomaly.test_reconstruction import Oracle


def test_the_coarse_flag_is_the_top_share_of_each_image_dilated():
    res = torch.zeros(2, 20, 20)
    res[0, 5, 5], res[1, 12, 14] = 1.0, 2.0
    m = coarse_mask(res, mask_percent=0.25)                      # 1 of 400 pixels per image
    assert m.shape == (2, 1, 20, 20) and m.sum((1, 2, 3)).tolist() == [1.0, 1.0] and m[0, 0, 5, 5] == 1
    d = coarse_mask(res, mask_percent=0.25, dilate=2)
    assert d.sum((1, 2, 3)).tolist() == [25.0, 25.0] and d[1, 0, 10:15, 12:17].all()
    with pytest.raises(ValueError, match="mask_percent=100"):
        coarse_mask(res, 100)


def test_the_fill_keeps_the_unflagged_pixels_and_continues_the_surroundings_into_the_flag():
    x = torch.linspace(-1, 1, 16).repeat(1, 1, 16, 1)           # a smooth horizontal ramp
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 6:10, 6:10] = 1
    bright = x + mask * 2.0                                      # a saturated square on the ramp
    filled = context_fill(bright, mask, sigma=2.0)
    assert torch.equal(filled[mask == 0], bright[mask == 0])
    assert (filled - x)[mask == 1].abs().max() < 0.15            # the ramp, not the square


def test_an_oracle_inpaints_the_flagged_region_back_to_the_clean_image_and_keeps_the_rest():
    sched = DDPMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(2, 1, 16, 16, generator=g) * 2 - 1
    artifact = torch.zeros_like(clean)
    artifact[:, :, 4:8, 4:8] = 0.8
    mask = (artifact > 0).float()[:, :1]
    oracle = Oracle(sched, clean)
    ph, info = inpaint(oracle, sched, clean + artifact, mask, t_inpaint=250, k=5, r=2, seed=1)
    assert torch.allclose(ph, clean, atol=1e-3)                  # inside: regenerated; outside: the image itself
    assert info["evaluations_per_image"] == 10 and oracle.calls == 10 and info["t_start"] <= 250
    again, _ = inpaint(oracle, sched, clean + artifact, mask, t_inpaint=250, k=5, r=2, seed=1)
    assert torch.equal(ph, again)
