"""Image + mask dictionary transforms and the 15 toggleable GlassBox augmentations.

Geometric augmentations (flips, rotation, zoom) are MONAI dictionary transforms applied to
``image`` and ``mask`` with one random draw, so the mask stays aligned (nearest-neighbour for the
mask, bilinear for the image). Photometric ones touch ``image`` only. MONAI provides brightness
(``RandShiftIntensityd``), contrast (``RandScaleIntensityFixedMeand``), gamma
(``RandAdjustContrastd``), blur, noise, flips, rotation and zoom; MONAI has no saturation, hue,
CLAHE, grey-level dilation/erosion or edge blending, so those five are small MONAI-style
``RandomizableTransform``s here built on torchvision / scikit-image / MONAI's ``SobelGradients``.

Images are float C×H×W in [0, 1] while augmenting; normalisation comes last.
"""
from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai import transforms as mt
from monai.config import KeysCollection

# Order matters: geometry first (image + mask), then photometric (image only), then clamp.
AUGMENTATIONS = (
    "hflip", "vflip", "rotation", "zoom",
    "brightness", "contrast", "gamma", "saturation", "hue", "clahe",
    "gaussian_blur", "gaussian_noise", "dilation", "erosion", "edge",
)
GEOMETRIC = {"hflip", "vflip", "rotation", "zoom"}
COLOUR_ONLY = {"saturation", "hue"}  # need 3 channels


def _range(cfg: Mapping[str, Any], key: str, name: str, lo: float | None = None) -> tuple[float, float]:
    vals = cfg.get(key)
    if vals is None or len(vals) != 2 or float(vals[0]) > float(vals[1]):
        raise ValueError(f"data.augment.{name}.{key} must be [min, max] with min <= max, got {vals}")
    a, b = float(vals[0]), float(vals[1])
    if lo is not None and a < lo:
        raise ValueError(f"data.augment.{name}.{key} must be >= {lo}, got {vals}")
    return a, b


class _RandImageOp(mt.RandomizableTransform, mt.MapTransform):
    """Base for image-only random ops: draws one factor in ``bounds`` per call."""

    def __init__(self, keys: KeysCollection, bounds: Sequence[float], prob: float, allow_missing_keys: bool = False):
        mt.RandomizableTransform.__init__(self, prob)
        mt.MapTransform.__init__(self, keys, allow_missing_keys)
        self.bounds = (float(bounds[0]), float(bounds[1]))
        self.factor = self.bounds[0]

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        if self._do_transform:
            self.factor = self.R.uniform(*self.bounds)

    def op(self, img: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            d[key] = self.op(torch.as_tensor(d[key]))
        return d


class RandSaturationd(_RandImageOp):
    """Scale colour saturation by a factor drawn from ``bounds`` (torchvision ``adjust_saturation``)."""

    def op(self, img: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        return TF.adjust_saturation(img.as_subclass(torch.Tensor), self.factor)


class RandHueShiftd(_RandImageOp):
    """Shift hue by a fraction of the colour wheel drawn from ``bounds`` (in [-0.5, 0.5])."""

    def op(self, img: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        return TF.adjust_hue(img.as_subclass(torch.Tensor), self.factor)


class RandCLAHEd(_RandImageOp):
    """Contrast-limited adaptive histogram equalisation (scikit-image ``equalize_adapthist``);
    the clip limit is drawn from ``bounds``; colour images are equalised on the HSV value channel."""

    def __init__(self, keys: KeysCollection, bounds: Sequence[float], prob: float, kernel_fraction: float = 0.125,
                 allow_missing_keys: bool = False):
        super().__init__(keys, bounds, prob, allow_missing_keys)
        self.kernel_fraction = kernel_fraction

    def op(self, img: torch.Tensor) -> torch.Tensor:
        from skimage.exposure import equalize_adapthist

        arr = img.as_subclass(torch.Tensor).clamp(0, 1).numpy()
        ks = max(4, int(min(arr.shape[1:]) * self.kernel_fraction))
        hwc = np.moveaxis(arr, 0, -1)
        out = equalize_adapthist(hwc[..., 0] if hwc.shape[-1] == 1 else hwc, kernel_size=ks, clip_limit=self.factor)
        out = out[None] if out.ndim == 2 else np.moveaxis(out, -1, 0)
        return torch.as_tensor(np.ascontiguousarray(out), dtype=img.dtype)


class _RandMorphd(_RandImageOp):
    """Grey-level morphology with an odd square kernel whose size is drawn from ``bounds``."""

    dilate = True

    def op(self, img: torch.Tensor) -> torch.Tensor:
        k = int(round(self.factor)) | 1  # odd
        x = img.as_subclass(torch.Tensor)[None]
        y = F.max_pool2d(x if self.dilate else -x, k, stride=1, padding=k // 2)
        return (y if self.dilate else -y)[0]


class RandDilationd(_RandMorphd):
    """Grey-level dilation (bright structures grow); image only."""

    dilate = True


class RandErosiond(_RandMorphd):
    """Grey-level erosion (dark structures grow); image only."""

    dilate = False


class RandEdgeBlendd(_RandImageOp):
    """Blend the image with its Sobel edge magnitude (MONAI ``SobelGradients``) by a weight drawn
    from ``bounds``: ``(1 - w) * image + w * edges``, edges scaled to [0, 1]."""

    def __init__(self, keys: KeysCollection, bounds: Sequence[float], prob: float, allow_missing_keys: bool = False):
        super().__init__(keys, bounds, prob, allow_missing_keys)
        self.sobel = mt.SobelGradients(kernel_size=3, spatial_axes=None)

    def op(self, img: torch.Tensor) -> torch.Tensor:
        x = img.as_subclass(torch.Tensor)
        grey = x.mean(0, keepdim=True)
        g = torch.as_tensor(self.sobel(grey)).as_subclass(torch.Tensor)  # (2, H, W)
        mag = g.pow(2).sum(0, keepdim=True).sqrt()
        mag = mag / mag.amax().clamp_min(1e-6)
        return (1 - self.factor) * x + self.factor * mag.expand_as(x)


def _clamp01(x: Any) -> torch.Tensor:
    return torch.as_tensor(x).clamp(0.0, 1.0)


def build_augmentation(name: str, cfg: Mapping[str, Any], keys: tuple[str, ...]) -> mt.Transform:
    """Build one augmentation from its config block (``prob`` plus its bounds).

    Args:
        name: one of :data:`AUGMENTATIONS`.
        cfg: the block ``data.augment.<name>``.
        keys: ``("image", "mask")`` or ``("image",)``.

    Raises:
        ValueError: unknown name or bad bounds, naming the config key.
    """
    p = float(cfg.get("prob", 0.5))
    if not 0 <= p <= 1:
        raise ValueError(f"data.augment.{name}.prob must be in [0, 1], got {p}")
    geo_modes = ["bilinear", "nearest"][: len(keys)]
    # torch "nearest" resizing is off by half a pixel against "bilinear"; "nearest-exact" is centred.
    zoom_modes = ["bilinear", "nearest-exact"][: len(keys)]
    img = "image"
    if name == "hflip":
        return mt.RandFlipd(keys, prob=p, spatial_axis=1, allow_missing_keys=True)
    if name == "vflip":
        return mt.RandFlipd(keys, prob=p, spatial_axis=0, allow_missing_keys=True)
    if name == "rotation":
        lo, hi = _range(cfg, "degrees", name)
        return mt.RandRotated(keys, range_x=(math.radians(lo), math.radians(hi)), prob=p, mode=geo_modes,
                              padding_mode="zeros", align_corners=False, allow_missing_keys=True)
    if name == "zoom":
        lo, hi = _range(cfg, "factors", name, lo=0.05)
        return mt.RandZoomd(keys, prob=p, min_zoom=lo, max_zoom=hi, mode=zoom_modes, padding_mode="constant",
                            keep_size=True, allow_missing_keys=True)
    if name == "brightness":
        return mt.RandShiftIntensityd(img, offsets=_range(cfg, "offsets", name), prob=p)
    if name == "contrast":
        return mt.RandScaleIntensityFixedMeand(img, factors=_range(cfg, "factors", name, lo=-1.0), prob=p,
                                               channel_wise=False)
    if name == "gamma":
        return mt.RandAdjustContrastd(img, gamma=_range(cfg, "gamma", name, lo=0.01), prob=p)
    if name == "saturation":
        return RandSaturationd(img, _range(cfg, "factors", name, lo=0.0), p)
    if name == "hue":
        lo, hi = _range(cfg, "shifts", name, lo=-0.5)
        if hi > 0.5:
            raise ValueError(f"data.augment.hue.shifts must lie in [-0.5, 0.5], got {[lo, hi]}")
        return RandHueShiftd(img, (lo, hi), p)
    if name == "clahe":
        return RandCLAHEd(img, _range(cfg, "clip_limit", name, lo=0.0), p,
                          kernel_fraction=float(cfg.get("kernel_fraction", 0.125)))
    if name == "gaussian_blur":
        s = _range(cfg, "sigma", name, lo=0.0)
        return mt.RandGaussianSmoothd(img, sigma_x=s, sigma_y=s, prob=p)
    if name == "gaussian_noise":
        std = float(cfg.get("std", 0.03))
        if std < 0:
            raise ValueError(f"data.augment.gaussian_noise.std must be >= 0, got {std}")
        return mt.RandGaussianNoised(img, prob=p, std=std, sample_std=True)
    if name == "dilation":
        return RandDilationd(img, _range(cfg, "kernel_size", name, lo=1), p)
    if name == "erosion":
        return RandErosiond(img, _range(cfg, "kernel_size", name, lo=1), p)
    if name == "edge":
        return RandEdgeBlendd(img, _range(cfg, "weight", name, lo=0.0), p)
    raise ValueError(f"unknown augmentation data.augment.{name}; allowed {list(AUGMENTATIONS)}")


def build_transforms(
    augment: Mapping[str, Any] | None,
    channels: int,
    normalize: Mapping[str, Sequence[float]] | None,
    train: bool,
    with_mask: bool = True,
    seed: int = 0,
) -> mt.Compose:
    """Compose the sample pipeline: augmentations (training only), clamp, normalisation.

    Args:
        augment: ``data.augment`` (name -> block with ``enabled``, ``prob`` and bounds).
        channels: image channels (saturation and hue need 3).
        normalize: ``{"mean": [...], "std": [...]}`` per channel, or ``None`` to keep [0, 1].
        train: apply augmentations.
        with_mask: move ``mask`` with geometric transforms.
        seed: random state of the pipeline.

    Raises:
        ValueError: unknown augmentation key, bad bounds, colour augmentation on grayscale data,
            or mean/std of the wrong length.
    """
    keys = ("image", "mask") if with_mask else ("image",)
    ops: list[mt.Transform] = []
    if train and augment:
        unknown = [k for k in augment if k not in AUGMENTATIONS]
        if unknown:
            raise ValueError(f"unknown augmentation key(s) data.augment.{unknown}; allowed {list(AUGMENTATIONS)}")
        for name in AUGMENTATIONS:
            block = augment.get(name)
            if not block or not block.get("enabled", False):
                continue
            if name in COLOUR_ONLY and channels != 3:
                raise ValueError(f"data.augment.{name} needs RGB images but data.channels={channels}; disable it")
            ops.append(build_augmentation(name, block, keys))
        ops.append(mt.Lambdad("image", _clamp01))
    if normalize is not None:
        mean, std = list(normalize["mean"]), list(normalize["std"])
        if len(mean) != channels or len(std) != channels or min(std) <= 0:
            raise ValueError(f"data.normalize mean/std need {channels} values (std > 0), got mean={mean} std={std}")
        ops.append(mt.NormalizeIntensityd("image", subtrahend=mean, divisor=std, channel_wise=True))
    ops.append(mt.EnsureTyped(list(keys), data_type="tensor", track_meta=False, dtype=torch.float32,
                              allow_missing_keys=True))
    pipe = mt.Compose(ops)
    pipe.set_random_state(seed=seed)
    return pipe


def denormalize(image: torch.Tensor, normalize: Mapping[str, Sequence[float]] | None) -> torch.Tensor:
    """Invert :func:`build_transforms` normalisation on a (B×)C×H×W tensor, back to [0, 1]."""
    if normalize is None:
        return image.clamp(0, 1)
    shape = (-1, 1, 1)
    mean = torch.tensor(list(normalize["mean"]), dtype=image.dtype, device=image.device).view(shape)
    std = torch.tensor(list(normalize["std"]), dtype=image.dtype, device=image.device).view(shape)
    return (image * std + mean).clamp(0, 1)
