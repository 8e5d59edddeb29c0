"""Partial-diffusion reconstruction with diffusers schedulers (SAFEGEN).

An image is noised to t₀ with the training scheduler (``DDPMScheduler.add_noise``) and brought back by a
short deterministic DDIM chain of K network evaluations, all at or below t₀, averaged over R noise draws.
``DDIMScheduler.set_timesteps(n)`` spaces its steps evenly over the whole training range, so
``set_timesteps(25)`` puts only 7 steps at or below t₀ = 250: :func:`chain_timesteps` picks the smallest
``n`` that puts at least K steps there and keeps the K largest. The chain starts at the first of them
(``t_start`` ≤ t₀, recorded), so the noise level and the first step agree. ``mode="ancestral"`` runs the
full DDPM chain from t₀ instead (t₀ + 1 evaluations per draw: for a fixed subset only).
"""
from __future__ import annotations

from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler


def chain_timesteps(scheduler: DDIMScheduler, t0: int, k: int) -> list[int]:
    """Set ``scheduler``'s timesteps so that at least ``k`` fall at or below ``t0`` and return the ``k``
    largest of those (descending; the last may be 0).

    Raises:
        ValueError: ``t0`` outside the training range, ``k`` < 1, or more steps than ``t0`` allows.
    """
    T = int(scheduler.config.num_train_timesteps)
    if not 0 < t0 < T:
        raise ValueError(f"t0={t0}: expected 0 < t0 < {T} (the scheduler's num_train_timesteps)")
    if k < 1 or k > t0 + 1:
        raise ValueError(f"K={k} steps: expected 1 <= K <= t0 + 1 = {t0 + 1}")
    for n in range(k, T + 1):
        scheduler.set_timesteps(n)
        below = [int(t) for t in scheduler.timesteps if int(t) <= t0]
        if len(below) >= k:
            return sorted(below, reverse=True)[:k]
    raise ValueError(f"no spacing of {T} training steps puts {k} steps at or below t0={t0}")


def _noise(shape: torch.Size, seed: int, draw: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(int(seed) * 1_000_003 + int(draw))
    return torch.randn(shape, generator=g).to(device)


@torch.no_grad()
def reconstruct(unet: Any, train_scheduler: DDPMScheduler, x: torch.Tensor, t0: int, k: int = 10, r: int = 1,
                seed: int = 0, mode: str = "ddim") -> tuple[torch.Tensor, dict[str, Any]]:
    """Reconstruct ``x`` (B×C×H×W in the model's range, e.g. [-1, 1]).

    Args:
        unet: called as ``unet(x_t, t).sample`` (a diffusers ``UNet2DModel``); its output is what the
            scheduler's ``prediction_type`` says.
        train_scheduler: the scheduler the model was trained with (β schedule, prediction type).
        t0: the noise level; k: DDIM steps; r: noise draws averaged; seed: the draws' seed (the same seed
            gives the same reconstruction).
        mode: ``ddim`` (k steps) or ``ancestral`` (the full DDPM chain from t0).

    Returns:
        ``(reconstruction, info)`` with ``info = {"t_start", "timesteps", "evaluations_per_image"}``.
    """
    if mode not in ("ddim", "ancestral"):
        raise ValueError(f"reconstruction mode {mode!r}: expected ddim or ancestral")
    if r < 1:
        raise ValueError(f"R={r} noise draws: expected >= 1")
    cfg = dict(train_scheduler.config)
    if mode == "ddim":
        sched: Any = DDIMScheduler.from_config(cfg, set_alpha_to_one=True, timestep_spacing="leading")
        steps = chain_timesteps(sched, t0, k)
    else:
        sched = DDPMScheduler.from_config(cfg)
        sched.set_timesteps(int(cfg["num_train_timesteps"]))
        steps = [int(t) for t in sched.timesteps if int(t) <= t0]
    t_start = steps[0]
    out = torch.zeros_like(x)
    for draw in range(r):
        noise = _noise(x.shape, seed, draw, x.device)
        xt = train_scheduler.add_noise(x, noise, torch.full((x.shape[0],), t_start, dtype=torch.long, device=x.device))
        g = torch.Generator(device="cpu").manual_seed(int(seed) * 7_919 + draw)
        for t in steps:
            pred = unet(xt, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)).sample
            if mode == "ddim":
                xt = sched.step(pred, t, xt, eta=0.0).prev_sample
            else:
                xt = sched.step(pred, t, xt, generator=g).prev_sample
        out += xt
    return out / r, {"t_start": t_start, "timesteps": steps, "evaluations_per_image": len(steps) * r, "mode": mode}


@torch.no_grad()
def mid_embedding(unet: Any, train_scheduler: DDPMScheduler, x: torch.Tensor, t0: int, seed: int = 0) -> torch.Tensor:
    """The UNet's mid-block output at t0 (the image noised with a seeded draw), averaged over space:
    the embedding of the contrastive score (B × channels)."""
    feats: list[torch.Tensor] = []
    handle = unet.mid_block.register_forward_hook(lambda _m, _i, o: feats.append(o[0] if isinstance(o, tuple) else o))
    try:
        noise = _noise(x.shape, seed, 0, x.device)
        t = torch.full((x.shape[0],), int(t0), dtype=torch.long, device=x.device)
        unet(train_scheduler.add_noise(x, noise, t), t)
    finally:
        handle.remove()
    return feats[0].mean(dim=(2, 3))
