"""Gradient attributions via captum: saliency and integrated gradients (with chosen baselines)."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients, Saliency

BASELINES = ("black", "blur", "mean", "noise")


def make_baseline(images: torch.Tensor, kind: str, black_value: torch.Tensor | None = None,
                  seed: int = 0) -> torch.Tensor:
    """IG baseline for normalised ``images`` (B×C×H×W).

    Args:
        kind: ``black`` (pixel value 0 before normalisation: pass ``black_value``, C×1×1),
            ``blur`` (heavy Gaussian blur of the image), ``mean`` (per-image channel mean) or
            ``noise`` (Gaussian noise with the image's statistics, seeded).

    Raises:
        ValueError: unknown kind.
    """
    if kind == "black":
        v = black_value if black_value is not None else torch.zeros(images.shape[1], 1, 1)
        return v.to(images).expand_as(images).clone()
    if kind == "mean":
        return images.mean((2, 3), keepdim=True).expand_as(images).clone()
    if kind == "blur":
        k = max(3, (min(images.shape[-2:]) // 4) | 1)
        sigma = k / 3
        ax = torch.arange(k, dtype=images.dtype) - k // 2
        g = torch.exp(-(ax**2) / (2 * sigma**2))
        g = (g / g.sum()).to(images)
        c = images.shape[1]
        x = F.conv2d(F.pad(images, (k // 2,) * 4, mode="reflect"), g.view(1, 1, 1, k).repeat(c, 1, 1, 1), groups=c)
        return F.conv2d(x, g.view(1, 1, k, 1).repeat(c, 1, 1, 1), groups=c)
    if kind == "noise":
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(images.shape, generator=gen).to(images)
        return noise * images.std((2, 3), keepdim=True) + images.mean((2, 3), keepdim=True)
    raise ValueError(f"xai.ig.baseline must be one of {BASELINES}, got {kind!r}")


def saliency(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """|d target / d input| (captum ``Saliency``), max over channels. Returns B×H×W."""
    attr = Saliency(forward).attribute(images.clone().requires_grad_(True), abs=True)
    return attr.amax(1).detach()


def integrated_gradients(forward: Callable[..., torch.Tensor], images: torch.Tensor,
                         baseline: torch.Tensor, n_steps: int = 32,
                         internal_batch_size: int | None = 8, fixed: torch.Tensor | None = None) -> torch.Tensor:
    """Integrated gradients (captum) summed over channels. Returns B×H×W (signed).

    ``internal_batch_size`` bounds memory: captum evaluates the ``n_steps`` path points in chunks of
    that many inputs; since captum needs at least one whole batch per chunk, the images are
    explained in groups of ``internal_batch_size``. ``fixed`` (B, or B×1×H×W): the target's fixed
    class/region, passed to ``forward`` as captum's additional argument so it follows the chunking.
    """
    ig = IntegratedGradients(forward)
    step = len(images) if not internal_batch_size else max(1, int(internal_batch_size))
    out = []
    for i in range(0, len(images), step):
        args = None if fixed is None else (fixed[i:i + step],)
        attr = ig.attribute(images[i:i + step], baselines=baseline[i:i + step], n_steps=n_steps,
                            internal_batch_size=internal_batch_size, additional_forward_args=args)
        out.append(attr.sum(1).detach())
    return torch.cat(out)
