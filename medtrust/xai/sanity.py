"""Sanity check for saliency methods: the model-parameter randomisation test.

Adebayo, Gilmer, Muelly, Goodfellow, Hardt & Kim, "Sanity Checks for Saliency Maps", NeurIPS 2018.
If an explanation method is faithful to the model, its maps must change substantially when the
model's learned weights are replaced by random ones. A method whose maps stay similar (e.g. an edge
detector, or guided back-propagation in the paper) explains the input, not the model. Similarity
is measured as in the paper: Spearman rank correlation of the absolute maps and SSIM.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from scipy import stats
from skimage.metrics import structural_similarity
from torch import nn


def randomised_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """Deep copy of ``model`` with its learnable parameters re-initialised (full, not cascading).

    Every submodule that defines ``reset_parameters()`` (Conv, Linear, normalisation layers, ...)
    is reset with its own default initialiser, under ``torch.random.fork_rng`` seeded with
    ``seed`` — so the copy is reproducible and the caller's global RNG state is untouched. Only
    parameters are randomised: all buffers (BatchNorm running mean/var, counters) keep their
    trained values, so an eval-mode copy differs from the original by its weights alone. Note
    that normalisation affine parameters reset to constants (weight 1, bias 0), not random values.
    Parameters not owned directly by a module with ``reset_parameters()`` cannot be reset this way;
    they are kept and a warning names them.

    Pitfall: for a model that was never trained, built right after ``torch.manual_seed(seed)``,
    the "randomised" copy can reproduce the original weights exactly (same seed, same
    initialisers, same order); use a different seed in that case.

    Args:
        model: trained model; not modified.
        seed: seed of the re-initialisation.

    Returns:
        The randomised copy (same class, same training/eval mode, same device).
    """
    rand = copy.deepcopy(model)
    buffers = {name: buf.detach().clone() for name, buf in rand.named_buffers()}
    covered: set[int] = set()
    cuda = sorted({p.device.index or 0 for p in rand.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        torch.manual_seed(seed)
        for module in rand.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
                covered.update(id(p) for p in module.parameters(recurse=False))
        for name, buf in rand.named_buffers():
            buf.copy_(buffers[name])
    missed = [name for name, p in rand.named_parameters() if id(p) not in covered]
    if missed:
        warnings.warn(f"randomised_copy: no reset_parameters() for {missed}; kept their trained values",
                      stacklevel=2)
    return rand


def _minmax(x: np.ndarray) -> np.ndarray | None:
    span = float(x.max() - x.min())
    return (x - x.min()) / span if span > 0 else None


def map_similarity(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Similarity of two explanation maps, as in Adebayo et al. (2018).

    Args:
        a: H×W map.
        b: H×W map.

    Returns:
        ``spearman_abs``: Spearman rank correlation of ``|a|`` and ``|b|``; ``ssim``:
        ``skimage.metrics.structural_similarity`` of the two maps, each min-max normalised to
        ``[0, 1]`` (so ``data_range=1``), with a window of ``min(7, H, W)`` pixels rounded down to
        odd. Each is NaN if a map is non-finite or constant (after ``abs`` for Spearman); SSIM is
        also NaN for maps smaller than 3×3.

    Raises:
        ValueError: maps not 2-D of the same shape.
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.ndim != 2 or x.shape != y.shape:
        raise ValueError(f"a and b must be H×W maps of one shape, got {x.shape} and {y.shape}")
    nan = {"spearman_abs": float("nan"), "ssim": float("nan")}
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return nan
    ax, ay = np.abs(x), np.abs(y)
    if np.ptp(ax) > 0 and np.ptp(ay) > 0:
        nan["spearman_abs"] = float(stats.spearmanr(ax.ravel(), ay.ravel()).statistic)
    nx, ny = _minmax(x), _minmax(y)
    win = min(7, *x.shape)
    win -= 1 - win % 2
    if nx is not None and ny is not None and win >= 3:
        nan["ssim"] = float(structural_similarity(nx, ny, data_range=1.0, win_size=win))
    return nan


def randomisation_check(explain: Callable[[nn.Module], np.ndarray], model: nn.Module, seed: int = 0,
                        threshold: float = 0.5) -> dict:
    """Model-parameter randomisation test of an explanation method.

    Args:
        explain: ``explain(model)`` returns N×H×W maps (numpy or torch) of a fixed set of N images;
            it must be deterministic apart from the model (fixed inputs, fixed targets).
        model: trained model; not modified.
        seed: seed of :func:`randomised_copy`.
        threshold: the method passes if the mean ``spearman_abs`` between trained-model and
            randomised-model maps is below it. Adebayo et al. give no cut-off; 0.5 is a convention
            of this project ("less than moderately rank-correlated"). Compare methods by the raw
            similarities, not only the flag.

    Returns:
        ``spearman_abs``, ``ssim``: means over images where defined (NaN if none);
        ``spearman_abs_per_image``, ``ssim_per_image``: lists of N floats (NaN where undefined);
        ``n_images``; ``n_undefined``: images with a NaN similarity; ``threshold``; ``passes``:
        ``bool(mean spearman_abs < threshold)`` (False if the mean is NaN).

    Raises:
        ValueError: the two explanations are not N×H×W of the same shape.
    """
    trained = explain(model)
    return compare_to_randomised(trained, explain(randomised_copy(model, seed)), threshold)


def compare_to_randomised(trained: Any, randomised: Any, threshold: float = 0.5) -> dict[str, Any]:
    """The randomisation test's verdict from the maps of the trained and of the randomised model
    (what :func:`randomisation_check` computes; explain.py calls this with maps it already has).

    Args:
        trained, randomised: N×H×W maps (numpy or torch) of the same images and targets.
        threshold: the method passes if the mean ``spearman_abs`` is below it.

    Returns:
        As :func:`randomisation_check`.

    Raises:
        ValueError: the maps are not N×H×W of the same shape.
    """
    def as_np(m: Any) -> np.ndarray:
        return (m.detach().cpu().numpy() if torch.is_tensor(m) else np.asarray(m)).astype(float)

    trained, randomised = as_np(trained), as_np(randomised)
    if trained.ndim != 3 or trained.shape != randomised.shape:
        raise ValueError(f"explain must return N×H×W maps of one shape, got {trained.shape} (trained) and "
                         f"{randomised.shape} (randomised)")
    sims = [map_similarity(a, b) for a, b in zip(trained, randomised)]
    sp = np.array([s["spearman_abs"] for s in sims], dtype=float)
    ss = np.array([s["ssim"] for s in sims], dtype=float)
    mean_sp = float(np.nanmean(sp)) if np.isfinite(sp).any() else float("nan")
    mean_ss = float(np.nanmean(ss)) if np.isfinite(ss).any() else float("nan")
    return {
        "spearman_abs": mean_sp,
        "ssim": mean_ss,
        "spearman_abs_per_image": sp.tolist(),
        "ssim_per_image": ss.tolist(),
        "n_images": len(sims),
        "n_undefined": int((~np.isfinite(sp) | ~np.isfinite(ss)).sum()),
        "threshold": float(threshold),
        "passes": bool(mean_sp < threshold),
    }
