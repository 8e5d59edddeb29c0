"""Metrics of a text + modality conditioned image generator (MINIM-style), per modality and overall.

Images are float tensors N×C×H×W in [0, 1]. Every function is a pure function of tensors (no task,
no data module); :func:`generation_metrics_json` assembles them into
``{"overall": {...}, "modalities": {name: {...}}}``. A figure that is undefined (too few images, a
missing input) is ``None`` -- never 0 -- with the reason in the block's ``notes``.

- Fidelity: FID (Heusel et al., 2017) and KID (Binkowski et al., 2018) from torchmetrics'
  ``FrechetInceptionDistance`` / ``KernelInceptionDistance``, and the Inception Score (Salimans et
  al., 2016) from ``InceptionScore``, in the feature space of a :class:`FeatureExtractor`. No
  Inception weights can be downloaded here, so unless :func:`inception_from_file` loaded them from a
  local file the features are another network's and every result says
  ``comparable_to_published: False``.
- Diversity: mean pairwise MS-SSIM (Wang et al., 2003) between repeated samples of one prompt
  (lower = more diverse), :func:`ms_ssim_diversity`.
- Memorisation: nearest training image by feature cosine, then SSIM among its top-k cosine
  neighbours, :func:`nearest_training` (Somepalli et al., 2023, "Diffusion art or digital forgery?").
- Alignment (CLIPScore-style, Hessel et al., 2021): an image encoder trained here with a symmetric
  InfoNCE loss against the frozen text embeddings, :class:`AlignmentModel`.
- Attribute faithfulness: accuracy of a judge's prediction against what the prompt asked for, with
  a Wilson (or bootstrap) CI, :func:`attribute_accuracy`.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from medtrust.metrics.stats import bootstrap_mean_ci

# Wang, Simoncelli & Bovik (2003), the 5-scale exponents (torchmetrics' default ``betas``).
MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
SSIM_SIGMA = 1.5  # the standard Gaussian window: 2 * int(3.5 * 1.5 + 0.5) + 1 = 11 px
INCEPTION_LAYERS = {"64": 64, "192": 192, "768": 768, "2048": 2048, "logits_unbiased": 1008, "logits": 1008}


# -- feature networks ------------------------------------------------------------------------------
@runtime_checkable
class FeatureNet(Protocol):
    """What FID / KID / IS need of a feature network (torchmetrics' ``feature=`` contract).

    ``__call__`` takes N×3×H×W images, either uint8 in [0, 255] (torchmetrics' ``normalize=False``
    convention, and what ``InceptionScore(normalize=True)`` passes) or float in [0, 1], and returns
    N×``num_features`` features (logits, for the Inception Score).
    """

    name: str
    num_features: int
    comparable_to_published: bool

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class FeatureExtractor(nn.Module):
    """A network as a :class:`FeatureNet`: uint8 or [0, 1] float images in, N×``num_features`` out.

    The wrapped net stays in eval mode (BatchNorm statistics of a judge must not move while it
    judges). Outputs that are maps (N×D×h×w) are average-pooled; a dict output needs ``output``.

    Args:
        net: the network; called on float images in [0, 1] (``input_range="unit"``) or uint8 images
            in [0, 255] (``input_range="uint8"``, e.g. torchmetrics' Inception).
        num_features: the feature dimension D the net produces (checked on every call).
        name: a description for the results' ``feature_network``.
        output: key of the net's output dict (e.g. a head name) or ``None`` for a tensor output.
        input_range: ``"unit"`` or ``"uint8"``.
        comparable_to_published: only True for the published Inception weights.

    Raises:
        ValueError: ``num_features < 1`` or an unknown ``input_range``; at call time, a float input
            outside [0, 1] or an output that is not N×``num_features``.
    """

    def __init__(self, net: nn.Module, num_features: int, name: str | None = None, output: str | None = None,
                 input_range: str = "unit", comparable_to_published: bool = False) -> None:
        super().__init__()
        if int(num_features) < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        if input_range not in ("unit", "uint8"):
            raise ValueError(f"input_range {input_range!r} is not one of ('unit', 'uint8')")
        self.net = net.eval()
        self.num_features = int(num_features)
        self.name = name or f"{type(net).__name__} ({num_features} features; not Inception)"
        self.output, self.input_range = output, input_range
        self.comparable_to_published = bool(comparable_to_published)

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)  # a frozen judge, as torchmetrics' NoTrainInceptionV3

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            unit = x.float() / 255
        else:
            if x.numel() and (float(x.min()) < -1e-6 or float(x.max()) > 1 + 1e-6):
                raise ValueError(f"float images must be in [0, 1] (got [{float(x.min()):.3g}, {float(x.max()):.3g}]); "
                                 "uint8 images must be in [0, 255]")
            unit = x.float().clamp(0, 1)
        inp = unit if self.input_range == "unit" else (unit * 255).round().to(torch.uint8)
        out = self.net(inp.to(_device(self.net)))
        if isinstance(out, Mapping):
            if self.output is None or self.output not in out:
                raise ValueError(f"the net returns a dict with keys {sorted(out)}; give output= one of them")
            out = out[self.output]
        elif isinstance(out, (tuple, list)):
            out = out[0]
        if out.ndim == 4:
            out = out.mean((2, 3))
        out = out.reshape(len(x), -1)
        if out.shape[1] != self.num_features:
            raise ValueError(f"{self.name}: features have dimension {out.shape[1]}, not num_features={self.num_features}")
        return out.double()


def feature_extractor(net: nn.Module, layer_dim: int, name: str | None = None, output: str | None = None,
                      input_range: str = "unit") -> FeatureExtractor:
    """``net`` as torchmetrics' ``feature=`` module (see :class:`FeatureExtractor`); D = ``layer_dim``."""
    return FeatureExtractor(net, layer_dim, name=name, output=output, input_range=input_range)


def inception_from_file(path: str | Path, layer: int | str = 2048) -> FeatureExtractor:
    """torchmetrics' FID Inception-v3 (torch-fidelity's TF-ported weights) from a local file.

    Args:
        path: the torch-fidelity weights file (``weights-inception-2015-12-05-6726825d.pth``).
        layer: ``64``, ``192``, ``768``, ``2048`` (the FID layer) or ``"logits_unbiased"`` (the IS logits).

    Returns:
        A :class:`FeatureExtractor` (uint8 input, resized to 299 px inside) with
        ``comparable_to_published=True``.

    Raises:
        FileNotFoundError: ``path`` does not exist (nothing can be downloaded here).
        ImportError: torch-fidelity (which defines the network) is not installed.
        ValueError: an unknown ``layer``, or a file that is not that network's state dict.
    """
    layer = str(layer)
    if layer not in INCEPTION_LAYERS:
        raise ValueError(f"Inception layer {layer!r} is not one of {sorted(INCEPTION_LAYERS)}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights file {path} does not exist; no weights can be downloaded here, "
                                "so give a local torch-fidelity file (weights-inception-2015-12-05-6726825d.pth) or "
                                "use another feature network")
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[layer],
                                 feature_extractor_weights_path=str(path))
    except ModuleNotFoundError as e:
        raise ImportError(f"inception_from_file({path}) needs torch-fidelity (it defines the FID Inception network), "
                          f"which is not installed: {e}") from e
    except (RuntimeError, KeyError, ValueError, OSError) as e:
        raise ValueError(f"{path} is not a torch-fidelity Inception-v3 state dict: {e}") from e
    return FeatureExtractor(net, INCEPTION_LAYERS[layer], name=f"Inception-v3 (torch-fidelity weights {path.name}, "
                            f"layer {layer})", input_range="uint8", comparable_to_published=True)


def _device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _describe(feature: nn.Module) -> dict[str, Any]:
    return {"feature_network": str(getattr(feature, "name", None) or f"{type(feature).__name__} (custom, not Inception)"),
            "comparable_to_published": bool(getattr(feature, "comparable_to_published", False))}


def _num(x: Any) -> float | None:
    """A finite float, else None (JSON has no NaN)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _ci(low_high: Sequence[float]) -> list[float] | None:
    lo, hi = (_num(v) for v in low_high[:2])
    return None if lo is None or hi is None else [lo, hi]


@torch.no_grad()
def extract_features(images: torch.Tensor, feature: nn.Module, batch_size: int = 64) -> torch.Tensor:
    """N×D float64 features of N×C×H×W images in [0, 1], in batches."""
    feats = [feature(images[i:i + batch_size]).double().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(feats) if feats else torch.empty(0, int(getattr(feature, "num_features", 0)), dtype=torch.float64)


# -- FID / KID / IS ---------------------------------------------------------------------------------
class _Precomputed(nn.Module):
    """Identity ``feature=`` module: the features were extracted once and are fed to FID and KID."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def fid_kid(real: torch.Tensor, fake: torch.Tensor, feature: nn.Module, kid_subset_size: int = 50, *,
            kid_subsets: int = 100, batch_size: int = 64, seed: int = 0) -> dict[str, Any]:
    """FID and KID of ``fake`` against ``real`` in the space of ``feature``.

    Features are extracted once (float [0, 1] images through ``feature``) and handed to torchmetrics'
    ``FrechetInceptionDistance`` and ``KernelInceptionDistance`` through an identity ``feature=``
    module, so the network runs once per image, not once per metric (same values as giving it to
    each metric: tested).

    Args:
        real, fake: N×C×H×W in [0, 1].
        feature: a :class:`FeatureNet` (any module with ``num_features`` taking [0, 1] floats).
        kid_subset_size: KID subset size, capped by the smaller sample count.
        kid_subsets: KID subsets (their mean and std are reported).
        batch_size: images per feature batch.
        seed: seed of KID's subset draws.

    Returns:
        See :func:`fid_kid_from_features`; plus ``feature_network``, ``comparable_to_published``.
    """
    out = fid_kid_from_features(extract_features(real, feature, batch_size), extract_features(fake, feature, batch_size),
                                kid_subset_size, kid_subsets=kid_subsets, seed=seed)
    return {**out, **_describe(feature)}


def fid_kid_from_features(real_feats: torch.Tensor, fake_feats: torch.Tensor, kid_subset_size: int = 50, *,
                          kid_subsets: int = 100, seed: int = 0) -> dict[str, Any]:
    """FID and KID (torchmetrics) from N×D feature matrices.

    Returns:
        ``{"fid", "kid_mean", "kid_std", "n_real", "n_fake", "kid_subset_size", "reason", "notes"}``:
        ``fid`` / ``kid_*`` are floats or ``None`` when a set has fewer than 2 images (``reason``
        says so); ``notes`` flags fewer images than feature dimensions (a rank-deficient covariance:
        FID is then strongly biased by the sample count, compare only at equal counts). FID is a
        squared distance; eigenvalue round-off below 0 is reported as 0.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    n_real, n_fake = len(real_feats), len(fake_feats)
    out: dict[str, Any] = {"fid": None, "kid_mean": None, "kid_std": None, "n_real": n_real, "n_fake": n_fake,
                           "kid_subset_size": None, "reason": None, "notes": []}
    if min(n_real, n_fake) < 2:
        out["reason"] = f"FID/KID need >= 2 real and >= 2 generated images (got {n_real} real, {n_fake} generated)"
        return out
    d = int(real_feats.shape[1])
    if min(n_real, n_fake) <= d:
        out["notes"].append(f"fewer images ({min(n_real, n_fake)}) than feature dimensions ({d}): rank-deficient "
                            "covariance, FID biased by the sample count")
    ident = _Precomputed(d)
    fid = FrechetInceptionDistance(feature=ident)
    fid.update(real_feats.double(), real=True)
    fid.update(fake_feats.double(), real=False)
    out["fid"] = max(0.0, float(fid.compute()))
    m = min(int(kid_subset_size), n_real, n_fake)
    with warnings.catch_warnings():  # "will save all extracted features": they are already in memory
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(feature=ident, subsets=int(kid_subsets), subset_size=m)
    kid.update(real_feats.double(), real=True)
    kid.update(fake_feats.double(), real=False)
    with torch.random.fork_rng(devices=[]):  # KID draws its subsets from the global generator
        torch.manual_seed(int(seed))
        kid_mean, kid_std = kid.compute()
    out.update(kid_mean=float(kid_mean), kid_std=float(kid_std), kid_subset_size=m)
    return out


def inception_score(fake: torch.Tensor, feature_logits_module: nn.Module, splits: int = 10, *,
                    batch_size: int = 64, seed: int = 0) -> dict[str, Any]:
    """Inception Score (torchmetrics ``InceptionScore``) of ``fake`` from a classifier's logits.

    Args:
        fake: N×C×H×W in [0, 1] (passed as uint8, ``normalize=True``).
        feature_logits_module: a :class:`FeatureNet` returning N×K class *logits* (e.g.
            :func:`inception_from_file` with ``layer="logits_unbiased"``, or a judge's head through
            :func:`feature_extractor` with ``output=``).
        splits: number of splits, capped so each has >= 2 images.
        seed: seed of IS's shuffle.

    Returns:
        ``{"is_mean", "is_std", "n_fake", "splits", "feature_network", "comparable_to_published",
        "reason"}``; ``None`` values (and ``reason``) below 2 images; ``is_std`` is ``None`` for one split.
    """
    from torchmetrics.image.inception import InceptionScore

    n = len(fake)
    out: dict[str, Any] = {"is_mean": None, "is_std": None, "n_fake": n, "splits": None, "reason": None,
                           **_describe(feature_logits_module)}
    if n < 2:
        out["reason"] = f"the Inception Score needs >= 2 generated images (got {n})"
        return out
    s = max(1, min(int(splits), n // 2))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = InceptionScore(feature=feature_logits_module, splits=s, normalize=True)
    for i in range(0, n, batch_size):
        metric.update(fake[i:i + batch_size])
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(int(seed))
        warnings.filterwarnings("ignore", message=".*degrees of freedom.*")  # one split: std undefined, reported None
        mean, std = metric.compute()
    out.update(is_mean=_num(mean), is_std=_num(std) if s > 1 else None, splits=s)
    return out


# -- diversity ---------------------------------------------------------------------------------------
def _window(sigma: float) -> int:
    """torchmetrics' Gaussian window for ``sigma`` (its ``kernel_size`` argument does not set it)."""
    return 2 * int(3.5 * sigma + 0.5) + 1


def ms_ssim_settings(height: int, width: int, max_scales: int = 5, min_scales: int = 2) -> dict[str, Any]:
    """MS-SSIM scales, window and exponents that fit an image of this size.

    With torchmetrics' Gaussian window the window is set by ``sigma`` alone (11 px at the standard
    sigma 1.5; ``kernel_size`` only enters its size checks), so instead of shrinking the window the
    number of scales is reduced: as many scales (<= 5) as keep the coarsest scale at least one window
    (11 px) wide and pass torchmetrics' check (size // (scales - 1)**2 > window - 1). The exponents
    are the first ``scales`` of Wang et al.'s five, renormalised to sum 1. At 64 px: 3 scales (64,
    32, 16 px), betas (0.0448, 0.2856, 0.3001) / 0.6305 = (0.071, 0.453, 0.476); 5 scales need 176 px.
    Below ``min_scales`` scales (< 22 px at the default 2) this falls back to single-scale SSIM with
    a window that fits (sigma shrunk until the window <= the image side).

    Returns:
        ``{"method": "ms_ssim" | "ssim", "scales", "kernel_size", "sigma", "betas"}``.

    Raises:
        ValueError: an image side below 3 px (no SSIM window fits).
    """
    side = min(int(height), int(width))
    win = _window(SSIM_SIGMA)
    for n in range(int(max_scales), max(2, int(min_scales)) - 1, -1):
        if side / 2 ** (n - 1) >= win and side >= 2 ** n and side // (n - 1) ** 2 > win - 1:
            betas = np.asarray(MS_SSIM_BETAS[:n]) / sum(MS_SSIM_BETAS[:n])
            return {"method": "ms_ssim", "scales": n, "kernel_size": win, "sigma": SSIM_SIGMA,
                    "betas": tuple(float(b) for b in betas)}
    return ssim_settings(height, width)


def ssim_settings(height: int, width: int) -> dict[str, Any]:
    """Single-scale SSIM settings: the standard 11-px window (sigma 1.5), or on images under 11 px the
    largest odd window that fits (sigma = half-width / 3.5, so that torchmetrics builds that window).

    Raises:
        ValueError: an image side below 3 px.
    """
    side = min(int(height), int(width))
    if side < 3:
        raise ValueError(f"images of {height}×{width} px are too small for SSIM (a side of >= 3 px is needed)")
    full = (_window(SSIM_SIGMA) - 1) // 2
    half = min(full, (side - 1) // 2)
    sigma = SSIM_SIGMA if half == full else half / 3.5  # _window(half / 3.5) == 2 * half + 1
    return {"method": "ssim", "scales": 1, "kernel_size": 2 * half + 1, "sigma": sigma, "betas": None}


def pairwise_similarity(a: torch.Tensor, b: torch.Tensor, settings: Mapping[str, Any]) -> torch.Tensor:
    """Per-pair MS-SSIM (or SSIM, per ``settings``) of P×C×H×W images ``a[i]`` vs ``b[i]``, data range 1."""
    from torchmetrics.functional.image import (
        multiscale_structural_similarity_index_measure,
        structural_similarity_index_measure,
    )

    a, b = a.float(), b.float()
    if settings["method"] == "ms_ssim":
        # normalize="relu": a negative contrast term at a coarse scale would give NaN under a fractional power
        return multiscale_structural_similarity_index_measure(
            a, b, sigma=settings["sigma"], kernel_size=settings["kernel_size"], betas=tuple(settings["betas"]),
            data_range=1.0, reduction="none", normalize="relu")
    return structural_similarity_index_measure(a, b, sigma=settings["sigma"], kernel_size=settings["kernel_size"],
                                               data_range=1.0, reduction="none")


def ms_ssim_diversity(groups: Sequence[torch.Tensor], *, n_boot: int = 1000, seed: int = 0,
                      settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Mean pairwise MS-SSIM between repeated samples of each prompt, averaged over prompts.

    Lower = more diverse (1 = the K samples are identical). Scales and window follow
    :func:`ms_ssim_settings` (at 64 px: 3 scales of the standard 11-px window; below 22 px a
    single-scale SSIM, flagged by ``fallback_ssim``).

    Args:
        groups: one K×C×H×W tensor in [0, 1] per prompt (K >= 2; groups with K < 2 are skipped, noted).
        n_boot, seed: bootstrap over prompts (BCa, :func:`medtrust.metrics.stats.bootstrap_mean_ci`).
        settings: override of :func:`ms_ssim_settings`.

    Returns:
        ``{"ms_ssim", "ci95", "per_prompt" (list), "n_prompts", "n_pairs", "method", "fallback_ssim",
        "scales", "kernel_size", "betas", "reason"}``; ``ms_ssim`` is ``None`` with a ``reason`` when
        no group has two samples; ``ci95`` is ``None`` below two prompts.
    """
    valid = [g for g in groups if len(g) >= 2]
    out: dict[str, Any] = {"ms_ssim": None, "ci95": None, "per_prompt": [], "n_prompts": len(valid), "n_pairs": 0,
                           "method": None, "fallback_ssim": None, "scales": None, "kernel_size": None, "betas": None,
                           "reason": None}
    skipped = len(groups) - len(valid)
    if not valid:
        out["reason"] = (f"MS-SSIM diversity needs >= 2 samples of a prompt ({len(groups)} groups, none with 2)")
        return out
    st = dict(settings or ms_ssim_settings(*valid[0].shape[-2:]))
    per_prompt, n_pairs = [], 0
    for g in valid:
        i, j = torch.triu_indices(len(g), len(g), offset=1)
        v = pairwise_similarity(g[i], g[j], st)
        per_prompt.append(float(v.double().mean()))
        n_pairs += len(v)
    lo_hi = bootstrap_mean_ci(per_prompt, n_boot=n_boot, seed=seed) if len(per_prompt) >= 2 else (None, None)
    out.update(ms_ssim=float(np.mean(per_prompt)), ci95=_ci(lo_hi) if len(per_prompt) >= 2 else None,
               per_prompt=per_prompt, n_pairs=n_pairs, method=st["method"], fallback_ssim=st["method"] == "ssim",
               scales=st["scales"], kernel_size=st["kernel_size"], betas=list(st["betas"]) if st["betas"] else None)
    if skipped:
        out["reason"] = f"{skipped} prompt(s) with fewer than 2 samples left out"
    return out


# -- memorisation ------------------------------------------------------------------------------------
def nearest_cosine(query: torch.Tensor, reference: torch.Tensor, k: int = 1,
                   chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` cosine similarities of each query row to the reference rows, in query chunks.

    Memory is O(chunk_size × M) (10k × 10k in 1024-row chunks: 40 MB per product), not O(N × M).

    Returns:
        ``(values, indices)``, each N×min(k, M), most similar first.
    """
    q = F.normalize(query.double(), dim=1)
    r = F.normalize(reference.double(), dim=1)
    k = min(int(k), len(r))
    vals, idx = [], []
    for s in range(0, len(q), int(chunk_size)):
        v, i = (q[s:s + int(chunk_size)] @ r.T).topk(k, dim=1)  # (chunk, M) -> (chunk, k)
        vals.append(v)
        idx.append(i)
    if not vals:
        return torch.empty(0, k, dtype=torch.float64), torch.empty(0, k, dtype=torch.long)
    return torch.cat(vals), torch.cat(idx)


def nearest_training(fake_feats: torch.Tensor, train_feats: torch.Tensor, fake_imgs: torch.Tensor,
                     train_imgs: torch.Tensor, cos_threshold: Any = 0.95, ssim_threshold: Any = 0.9, *,
                     topk_ssim: int = 5, chunk_size: int = 1024, ssim_batch: int = 256, n_boot: int = 1000,
                     seed: int = 0) -> dict[str, Any]:
    """For each generated image, its nearest training image (feature cosine) and the best SSIM among
    its ``topk_ssim`` cosine neighbours; a near copy has cosine >= ``cos_threshold`` or SSIM >=
    ``ssim_threshold``.

    SSIM is torchmetrics' (11-px Gaussian window, smaller on tiny images; data range 1), on the
    images as given (fake and train images must have the same size).

    Args:
        fake_feats, train_feats: N×D and M×D features (e.g. the judge's or Inception's).
        fake_imgs, train_imgs: N×C×H×W and M×C×H×W in [0, 1], aligned with the features.
        cos_threshold, ssim_threshold: the near-copy thresholds: one value, or one per generated
            image (e.g. per modality, from :func:`calibrate_copy_thresholds`).
        topk_ssim: cosine neighbours whose SSIM is computed (capped by M).
        chunk_size: query rows per cosine product (:func:`nearest_cosine`).
        ssim_batch: image pairs per SSIM batch.
        n_boot, seed: bootstrap of the near-copy share.

    Returns:
        ``{"rows": [{"fake", "nearest", "cosine", "ssim", "ssim_nearest", "near_copy"}] (one per
        generated image; ``ssim_nearest`` = the train index of the best SSIM), "memorised_share",
        "memorised_share_ci", "n_fake", "n_train", "topk_ssim", "reason"}``; the share is ``None``
        without generated or training images.

    Raises:
        ValueError: features and images of different lengths, or fake and train images of different sizes.
    """
    n, m = len(fake_feats), len(train_feats)
    if len(fake_imgs) != n or len(train_imgs) != m:
        raise ValueError(f"features and images differ in length: fake {n} vs {len(fake_imgs)}, "
                         f"train {m} vs {len(train_imgs)}")
    out: dict[str, Any] = {"rows": [], "memorised_share": None, "memorised_share_ci": None, "n_fake": n, "n_train": m,
                           "topk_ssim": min(int(topk_ssim), m), "reason": None}
    if n == 0 or m == 0:
        out["reason"] = f"memorisation needs generated and training images (got {n} generated, {m} training)"
        return out
    if tuple(fake_imgs.shape[1:]) != tuple(train_imgs.shape[1:]):
        raise ValueError(f"fake images {tuple(fake_imgs.shape[1:])} and training images {tuple(train_imgs.shape[1:])} "
                         "differ in size; resize one set first")
    cos, idx = nearest_cosine(fake_feats, train_feats, k=max(1, int(topk_ssim)), chunk_size=chunk_size)  # (N, k)
    k = idx.shape[1]
    st = ssim_settings(*fake_imgs.shape[-2:])
    pair_fake = torch.arange(n).repeat_interleave(k)
    pair_train = idx.reshape(-1)
    ssim = torch.cat([pairwise_similarity(fake_imgs[pair_fake[s:s + ssim_batch]], train_imgs[pair_train[s:s + ssim_batch]], st)
                      for s in range(0, len(pair_fake), int(ssim_batch))]).double().reshape(n, k)
    best_ssim, best_j = ssim.max(1)
    flags = ((cos[:, 0] >= torch.as_tensor(cos_threshold, dtype=cos.dtype))
             | (best_ssim >= torch.as_tensor(ssim_threshold, dtype=best_ssim.dtype)))
    out["rows"] = [{"fake": i, "nearest": int(idx[i, 0]), "cosine": float(cos[i, 0]), "ssim": float(best_ssim[i]),
                    "ssim_nearest": int(idx[i, best_j[i]]), "near_copy": bool(flags[i])} for i in range(n)]
    share = share_with_ci(flags.numpy(), n_boot=n_boot, seed=seed)
    out.update(memorised_share=share["value"], memorised_share_ci=share["ci95"])
    return out


def calibrate_copy_thresholds(cosine: Sequence[float], ssim: Sequence[float], groups: Sequence[str], *,
                              quantile: float = 0.99, min_images: int = 20) -> dict[str, Any]:
    """Near-copy thresholds fitted on REAL held-out images: per group (modality), the ``quantile`` of
    their nearest-training-image cosine and best SSIM.

    A held-out real image is, by definition, not a copy of a training image; on data as repetitive
    as a phantom its nearest training image is already very similar (cosine > 0.99), so fixed
    thresholds call every fresh sample a copy. Calibrated here, a generator that samples fresh
    images from the data distribution flags at most about ``2 (1 - quantile)`` of them (the null
    rate); a generator that copies flags more. Groups with fewer than ``min_images`` real images
    use the thresholds of all groups pooled.

    Args:
        cosine, ssim: per real held-out image, as ``rows`` of :func:`nearest_training`.
        groups: each image's group (e.g. its modality name).

    Returns:
        ``{"quantile", "pooled": {"cosine", "ssim", "n"}, "groups": {g: {"cosine", "ssim", "n", "pooled"}}}``.

    Raises:
        ValueError: lengths differ, no images, or a quantile outside (0, 1).
    """
    c, s_, g = np.asarray(cosine, float), np.asarray(ssim, float), np.asarray(groups, dtype=object)
    if not len(c) == len(s_) == len(g):
        raise ValueError(f"cosine, ssim and groups differ in length: {len(c)}, {len(s_)}, {len(g)}")
    if len(c) == 0:
        raise ValueError("near-copy thresholds need real held-out images; got none")
    if not 0 < float(quantile) < 1:
        raise ValueError(f"evaluation.memorisation.quantile must be in (0, 1), got {quantile}")
    q = float(quantile)
    pooled = {"cosine": float(np.quantile(c, q)), "ssim": float(np.quantile(s_, q)), "n": int(len(c))}
    out: dict[str, Any] = {"quantile": q, "pooled": pooled, "groups": {}}
    for name in dict.fromkeys(g.tolist()):
        sel = g == name
        if int(sel.sum()) >= int(min_images):
            out["groups"][str(name)] = {"cosine": float(np.quantile(c[sel], q)), "ssim": float(np.quantile(s_[sel], q)),
                                        "n": int(sel.sum()), "pooled": False}
        else:
            out["groups"][str(name)] = {**pooled, "n": int(sel.sum()), "pooled": True}
    return out


def share_with_ci(flags: np.ndarray | Sequence[bool], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Share of True flags with a bootstrap CI (BCa; percentile when degenerate, e.g. all False).

    Returns:
        ``{"value": float | None, "ci95": [low, high] | None, "n": int}``.
    """
    v = np.asarray(flags, dtype=float).ravel()
    if len(v) == 0:
        return {"value": None, "ci95": None, "n": 0}
    ci = _ci(bootstrap_mean_ci(v, n_boot=n_boot, seed=seed)) if len(v) >= 2 else None
    return {"value": float(v.mean()), "ci95": ci, "n": int(len(v))}


# -- alignment ----------------------------------------------------------------------------------------
class AlignmentModel(nn.Module):
    """A small image encoder projected into a frozen text-embedding space (CLIP-style).

    Three stride-2 conv blocks (GroupNorm, so a batch of one is fine) -> global average pooling ->
    a linear map to ``text_dim``; embeddings are L2-normalised. ``logit_scale`` is CLIP's learnable
    inverse temperature (initial 1 / 0.07, capped at 100).

    Args:
        text_dim: dimension of the text embeddings it is trained against.
        channels: image channels.
        width: channels of the first block (then 2×, 4×).
    """

    def __init__(self, text_dim: int, channels: int = 3, width: int = 32) -> None:
        super().__init__()
        if int(text_dim) < 1 or int(width) < 1:
            raise ValueError(f"text_dim and width must be >= 1, got {text_dim}, {width}")
        self.text_dim, self.channels, self.width = int(text_dim), int(channels), int(width)
        layers: list[nn.Module] = []
        c_in = self.channels
        for c in (self.width, 2 * self.width, 4 * self.width):
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(math.gcd(8, c), c), nn.ReLU(inplace=True),
                       nn.Conv2d(c, c, 3, padding=1), nn.ReLU(inplace=True)]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.proj = nn.Linear(c_in, self.text_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def config(self) -> dict[str, int]:
        """Constructor arguments (``AlignmentModel(**model.config())`` rebuilds it for ``load_state_dict``)."""
        return {"text_dim": self.text_dim, "channels": self.channels, "width": self.width}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """N×C×H×W in [0, 1] -> N×text_dim unit vectors."""
        f = self.body((x - 0.5) / 0.25).mean((2, 3))
        return F.normalize(self.proj(f), dim=1)


def info_nce(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP) over a batch of unit vectors; rows with the same text are all positives
    (identical prompts in a batch are not negatives of each other)."""
    logits = logit_scale.exp().clamp(max=100) * img @ txt.T  # (B, B)
    same = (txt @ txt.T > 1 - 1e-6).double()
    target = (same / same.sum(1, keepdim=True)).to(logits.dtype)  # symmetric positives: same for both directions
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def train_alignment_model(images: torch.Tensor, text_emb: torch.Tensor, epochs: int = 15, batch_size: int = 64,
                          lr: float = 2e-3, seed: int = 0, width: int = 32) -> AlignmentModel:
    """Train an :class:`AlignmentModel` on (image, text embedding) pairs; the text side is frozen.

    AdamW, no augmentation. Deterministic for a seed on one machine (its own ``torch.Generator`` for
    the order; weights initialised under a forked, seeded global RNG, which is left as it was).

    Args:
        images: N×C×H×W in [0, 1].
        text_emb: N×D text embeddings (e.g. the pooled output of the generator's text encoder).
        epochs, batch_size, lr: optimisation.
        seed: seed of initialisation and order.
        width: encoder width.

    Returns:
        The trained model, in eval mode.

    Raises:
        ValueError: images and embeddings of different lengths, or fewer than 2 pairs.
    """
    if len(images) != len(text_emb) or len(images) < 2:
        raise ValueError(f"need >= 2 (image, text) pairs of equal count, got {len(images)} images, {len(text_emb)} texts")
    txt = F.normalize(text_emb.detach().float(), dim=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = AlignmentModel(txt.shape[1], images.shape[1], width)
    g = torch.Generator().manual_seed(int(seed))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    with torch.enable_grad():
        for _ in range(int(epochs)):
            order = torch.randperm(len(images), generator=g)
            for s in range(0, len(order), int(batch_size)):
                b = order[s:s + int(batch_size)]
                if len(b) < 2:  # a batch of one has no negatives
                    continue
                loss = info_nce(model(images[b].float()), txt[b], model.logit_scale)
                opt.zero_grad()
                loss.backward()
                opt.step()
    return model.eval()


@torch.no_grad()
def alignment_scores(model: AlignmentModel, images: torch.Tensor, text_emb: torch.Tensor,
                     batch_size: int = 256) -> np.ndarray:
    """CLIPScore-style alignment of each image with its text: ``100 * max(cos(image, text), 0)``.

    As CLIPScore (Hessel et al., 2021, with w = 100 here, not 2.5), negative cosines are clipped to 0,
    so a score is in [0, 100]; note the clip compresses differences near chance.

    Returns:
        N float64 scores (numpy).
    """
    if len(images) != len(text_emb):
        raise ValueError(f"{len(images)} images but {len(text_emb)} text embeddings")
    model.eval()
    txt = F.normalize(text_emb.detach().float(), dim=1)
    scores = [(model(images[s:s + batch_size].float().to(_device(model))).cpu() * txt[s:s + batch_size]).sum(1)
              for s in range(0, len(images), batch_size)]
    cos = torch.cat(scores).double() if scores else torch.empty(0, dtype=torch.float64)
    return (100 * cos.clamp_min(0)).numpy()


def alignment_contrast(scores_a: np.ndarray | Sequence[float], scores_b: np.ndarray | Sequence[float], *,
                       n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Paired difference ``mean(a - b)`` with a BCa bootstrap CI over images (e.g. guided vs
    unguided, or matching vs shuffled prompts; the same images in both).

    Returns:
        ``{"diff", "ci95", "mean_a", "mean_b", "n", "reason"}``; ``diff`` is ``None`` with no pair and
        ``ci95`` is ``None`` below two pairs.

    Raises:
        ValueError: ``a`` and ``b`` of different lengths (not paired).
    """
    a, b = np.asarray(scores_a, float).ravel(), np.asarray(scores_b, float).ravel()
    if len(a) != len(b):
        raise ValueError(f"paired scores differ in length: {len(a)} vs {len(b)}")
    d = a - b
    ok = np.isfinite(d)
    out: dict[str, Any] = {"diff": None, "ci95": None, "mean_a": None, "mean_b": None, "n": int(ok.sum()), "reason": None}
    if not ok.any():
        out["reason"] = "no paired scores"
        return out
    out.update(diff=float(d[ok].mean()), mean_a=float(a[ok].mean()), mean_b=float(b[ok].mean()))
    if ok.sum() >= 2:
        out["ci95"] = _ci(bootstrap_mean_ci(d[ok], n_boot=n_boot, seed=seed))
    else:
        out["reason"] = "one pair: no CI"
    return out


# -- attribute accuracy --------------------------------------------------------------------------------
def _as_array(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def attribute_accuracy(pred: Any, target: Any, *, method: str = "wilson", n_boot: int = 1000,
                       seed: int = 0) -> dict[str, Any]:
    """Accuracy of ``pred`` against ``target`` (what the prompt asked for) with a 95 % CI.

    ``method="wilson"`` (default): the Wilson score interval (``scipy.stats.binomtest``), defined and
    not degenerate at 0 or 100 % accuracy, where a bootstrap collapses to a point. ``"bca"`` /
    ``"percentile"``: a bootstrap over images (:func:`medtrust.metrics.stats.bootstrap_mean_ci`).

    Args:
        pred, target: N labels (ints, strings or bools; tensors, arrays or lists), compared elementwise.

    Returns:
        ``{"accuracy", "ci95", "n", "n_correct", "ci_method", "reason"}``; ``accuracy`` is ``None``
        for no image.

    Raises:
        ValueError: an unknown ``method`` or ``pred`` and ``target`` of different lengths.
    """
    if method.lower() not in ("wilson", "bca", "percentile"):
        raise ValueError(f"CI method {method!r} is not one of ('wilson', 'bca', 'percentile')")
    p, t = _as_array(pred).ravel(), _as_array(target).ravel()
    if len(p) != len(t):
        raise ValueError(f"pred and target differ in length: {len(p)} vs {len(t)}")
    n = len(p)
    out: dict[str, Any] = {"accuracy": None, "ci95": None, "n": n, "n_correct": 0, "ci_method": method.lower(),
                           "reason": None}
    if n == 0:
        out["reason"] = "no images"
        return out
    correct = p == t
    k = int(correct.sum())
    out.update(accuracy=k / n, n_correct=k)
    if method.lower() == "wilson":
        from scipy.stats import binomtest

        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        out["ci95"] = [float(ci.low), float(ci.high)]
    elif n >= 2:
        out["ci95"] = _ci(bootstrap_mean_ci(correct.astype(float), n_boot=n_boot, seed=seed,
                                            method="BCa" if method.lower() == "bca" else "percentile"))
    return out


# -- per modality and overall ------------------------------------------------------------------------------
def per_group(rows: Any, key: str | None, fn: Callable[[np.ndarray], Any],
              order: Sequence[Hashable] | None = None) -> dict[str, Any]:
    """``fn`` on all rows and on the rows of each value of ``key``.

    Args:
        rows: a sequence of mappings, a pandas DataFrame, or (``key=None``) the group labels themselves.
        key: the grouping field (e.g. ``"modality"``).
        fn: ``fn(row_indices: np.ndarray) -> result`` (indices so it can slice tensors too).
        order: group order (values absent from ``rows`` are left out); default first appearance.

    Returns:
        ``{"overall": fn(all), "groups": {str(value): fn(rows of value)}}``.
    """
    if key is None:
        labels = list(_as_array(rows).ravel()) if not isinstance(rows, (list, tuple)) else list(rows)
    elif hasattr(rows, "columns"):
        labels = list(rows[key])
    else:
        labels = [r[key] for r in rows]
    arr = np.asarray(labels, dtype=object)
    present = set(labels)
    values = list(dict.fromkeys(labels)) if order is None else [v for v in order if v in present]
    return {"overall": fn(np.arange(len(labels))),
            "groups": {str(v): fn(np.flatnonzero(arr == v)) for v in values}}


def generation_metrics_json(modality: Sequence[str], *, fake: torch.Tensor | None = None,
                            real: torch.Tensor | None = None, real_modality: Sequence[str] | None = None,
                            feature: nn.Module | None = None, kid_subset_size: int = 50,
                            prompt_id: Sequence[Hashable] | None = None, alignment: Any = None,
                            modality_pred: Any = None, finding_pred: Any = None, finding_target: Any = None,
                            near_copy: Any = None, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The generation figures per modality and overall, as JSON-ready dicts.

    Each input but ``modality`` is optional; a figure whose input is missing or too small is ``None``
    with the reason in the block's ``notes``. Per modality, FID/KID compare that modality's generated
    images with that modality's real ones; overall, all with all.

    Args:
        modality: N modality names asked for by the prompts of the generated images.
        fake: N×C×H×W generated images in [0, 1] (FID, KID, MS-SSIM).
        real, real_modality: M real images in [0, 1] and their modality names (FID, KID).
        feature: the :class:`FeatureNet` of FID / KID.
        kid_subset_size: capped by the sample counts.
        prompt_id: N ids; the repeated samples of a prompt share one (MS-SSIM diversity).
        alignment: N alignment scores (:func:`alignment_scores`).
        modality_pred: N modality names predicted by a judge (accuracy against ``modality``).
        finding_pred, finding_target: N predicted and asked findings.
        near_copy: N near-copy flags (:func:`nearest_training` rows).
        n_boot, seed: bootstraps.

    Returns:
        ``{"overall": block, "modalities": {name: block}, "feature_network", "comparable_to_published"}``,
        each block ``{"n_images", "n_real", "fid", "kid", "kid_std", "ms_ssim", "ms_ssim_ci", "alignment",
        "alignment_ci", "modality_accuracy", "modality_accuracy_ci", "finding_accuracy",
        "finding_accuracy_ci", "memorised_share", "memorised_share_ci", "notes"}``.
    """
    mods = [str(m) for m in modality]
    n = len(mods)
    real_mods = np.asarray([str(m) for m in real_modality], dtype=object) if real_modality is not None else None
    feats_fake = extract_features(fake, feature) if fake is not None and feature is not None else None
    feats_real = extract_features(real, feature) if real is not None and feature is not None else None

    def _opt(x: Any) -> np.ndarray | None:
        if x is None:
            return None
        a = _as_array(x).ravel()
        if len(a) != n:
            raise ValueError(f"an input has {len(a)} entries for {n} generated images")
        return a

    align, mod_pred, f_pred, f_tgt, copies = (_opt(x) for x in (alignment, modality_pred, finding_pred,
                                                                finding_target, near_copy))
    pid = _opt(prompt_id) if prompt_id is not None else None
    if fake is not None and len(fake) != n:
        raise ValueError(f"{len(fake)} generated images for {n} modality entries")

    def block(idx: np.ndarray, name: str | None) -> dict[str, Any]:
        notes: list[str] = []
        b: dict[str, Any] = {"n_images": int(len(idx)), "n_real": None}
        if feats_fake is not None and feats_real is not None:
            rsel = np.arange(len(feats_real)) if name is None or real_mods is None else np.flatnonzero(real_mods == name)
            fk = fid_kid_from_features(feats_real[rsel], feats_fake[idx], kid_subset_size, seed=seed)
            b.update(n_real=int(len(rsel)), fid=_num(fk["fid"]), kid=_num(fk["kid_mean"]), kid_std=_num(fk["kid_std"]))
            notes += [fk["reason"]] if fk["reason"] else []
            notes += fk["notes"]
        else:
            b.update(fid=None, kid=None, kid_std=None)
            notes.append("FID/KID not measured (no real or generated images, or no feature network)")
        if fake is not None and pid is not None:
            ids = pid[idx]
            groups = [fake[idx[ids == v]] for v in dict.fromkeys(ids.tolist())]
            div = ms_ssim_diversity(groups, n_boot=n_boot, seed=seed)
            b.update(ms_ssim=div["ms_ssim"], ms_ssim_ci=div["ci95"])
            notes += [div["reason"]] if div["reason"] else []
            if div["fallback_ssim"]:
                notes.append("images too small for MS-SSIM: single-scale SSIM")
        else:
            b.update(ms_ssim=None, ms_ssim_ci=None)
            notes.append("MS-SSIM diversity not measured (no images or no prompt ids)")
        if align is not None and len(idx):
            v = align[idx].astype(float)
            b.update(alignment=float(np.nanmean(v)),
                     alignment_ci=_ci(bootstrap_mean_ci(v, n_boot=n_boot, seed=seed)) if len(v) >= 2 else None)
        else:
            b.update(alignment=None, alignment_ci=None)
            notes.append("alignment not measured")
        for label, p, t in (("modality", mod_pred, np.asarray(mods, dtype=object)), ("finding", f_pred, f_tgt)):
            if p is not None and t is not None and len(idx):
                acc = attribute_accuracy(p[idx].astype(str), t[idx].astype(str))
                b.update({f"{label}_accuracy": acc["accuracy"], f"{label}_accuracy_ci": acc["ci95"]})
            else:
                b.update({f"{label}_accuracy": None, f"{label}_accuracy_ci": None})
                notes.append(f"{label} accuracy not measured")
        if copies is not None and len(idx):
            sh = share_with_ci(copies[idx].astype(bool), n_boot=n_boot, seed=seed)
            b.update(memorised_share=sh["value"], memorised_share_ci=sh["ci95"])
        else:
            b.update(memorised_share=None, memorised_share_ci=None)
            notes.append("memorisation not measured")
        b["notes"] = notes
        return b

    overall = block(np.arange(n), None)
    per_mod = {m: block(np.flatnonzero(np.asarray(mods, dtype=object) == m), m) for m in dict.fromkeys(mods)}
    desc = _describe(feature) if feature is not None else {"feature_network": None, "comparable_to_published": False}
    return {"overall": overall, "modalities": per_mod, **desc}
