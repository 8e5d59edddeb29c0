"""Partial-diffusion reconstruction: the chain's timesteps, and the chain's arithmetic checked with an
oracle denoiser that knows the clean image (so the reconstruction must return it exactly)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from medtrust.anomaly.reconstruction import chain_timesteps, mid_embedding, reconstruct


def test_set_timesteps_25_puts_only_7_steps_below_250_and_the_chain_gets_k():
    s = DDIMScheduler(num_train_timesteps=1000)
    s.set_timesteps(25)
    assert sum(int(t) <= 250 for t in s.timesteps) == 7  # the observation
    for t0 in (50, 100, 250, 400):
        for k in (1, 3, 5, 10, 25):
            steps = chain_timesteps(DDIMScheduler(num_train_timesteps=1000), t0, k)
            assert len(steps) == k and all(0 <= t <= t0 for t in steps) and steps == sorted(steps, reverse=True)
    with pytest.raises(ValueError, match="expected 0 < t0 < 1000"):
        chain_timesteps(DDIMScheduler(num_train_timesteps=1000), 1000, 5)
    with pytest.raises(ValueError, match="K=0 steps"):
        chain_timesteps(DDIMScheduler(num_train_timesteps=1000), 250, 0)


class Oracle(torch.nn.Module):
    """Predicts the noise that would make ``clean`` the denoised image (epsilon prediction)."""

    def __init__(self, scheduler: DDPMScheduler, clean: torch.Tensor):
        super().__init__()
        self.ab, self.clean, self.calls = scheduler.alphas_cumprod, clean, 0

    def forward(self, xt, t):
        self.calls += 1
        a = self.ab[t].view(-1, 1, 1, 1)
        return SimpleNamespace(sample=(xt - a.sqrt() * self.clean) / (1 - a).sqrt())


@pytest.mark.parametrize("mode", ["ddim", "ancestral"])
def test_an_oracle_denoiser_reconstructs_the_clean_image_and_the_residual_is_the_artifact(mode):
    sched = DDPMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(2, 1, 16, 16, generator=g) * 2 - 1
    artifact = torch.zeros_like(clean)
    artifact[:, :, 4:8, 4:8] = 0.8
    oracle = Oracle(sched, clean)
    t0 = 100 if mode == "ancestral" else 250
    rec, info = reconstruct(oracle, sched, clean + artifact, t0=t0, k=5, r=2, seed=3, mode=mode)
    assert torch.allclose(rec, clean, atol=1e-3)
    assert torch.allclose((clean + artifact - rec).abs(), artifact, atol=1e-3)
    per_draw = 5 if mode == "ddim" else t0 + 1
    assert info["evaluations_per_image"] == 2 * per_draw and oracle.calls == 2 * per_draw
    assert info["t_start"] <= t0


def test_the_same_seed_gives_the_same_reconstruction_and_another_seed_another():
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=4, attention_head_dim=4).eval()
    sched = DDPMScheduler(num_train_timesteps=1000)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    a, _ = reconstruct(unet, sched, x, t0=200, k=3, seed=1)
    b, _ = reconstruct(unet, sched, x, t0=200, k=3, seed=1)
    c, _ = reconstruct(unet, sched, x, t0=200, k=3, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    e = mid_embedding(unet, sched, x, t0=200)
    assert e.shape == (2, 16) and torch.equal(e, mid_embedding(unet, sched, x, t0=200))
    with pytest.raises(ValueError, match="mode 'full'"):
        reconstruct(unet, sched, x, t0=200, mode="full")
