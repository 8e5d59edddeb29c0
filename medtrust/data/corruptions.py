"""Image corruptions at five severities: MedMNIST-C's set (Di Salvo et al. 2024, "MedMNIST-C:
Comprehensive benchmark and improved classifier robustness by simulating realistic image
corruptions"), with its published severity parameters for chest X-rays as the defaults in
``conf/shift/corruptions.yaml``.

Re-implemented here on uint8 arrays with NumPy / PIL / torchvision rather than imported from the
``medmnistc`` package: it pins ``scikit-image==0.23.2`` (this project uses 0.26), ``medmnist==3.0.1``
and needs ImageMagick through ``Wand``. Each function follows the package's definition of the same
name (noise on [0, 1] intensities, PIL enhancers, OpenCV's Gaussian-kernel rule for blur sizes);
``tests/unit/data/test_corruptions.py`` checks severity ordering and the definitions.
"""
from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance


def _f(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float64) / 255.0


def _u8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)


def _pil(img: np.ndarray) -> Image.Image:
    return Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)


def _back(im: Image.Image, like: np.ndarray) -> np.ndarray:
    a = np.asarray(im, dtype=np.uint8)
    return a[..., None] if a.ndim == 2 and like.ndim == 3 else a


def gaussian_noise(img: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    return _u8(_f(img) + rng.normal(0, s, img.shape))


def speckle_noise(img: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    x = _f(img)
    return _u8(x + x * rng.normal(0, s, img.shape))


def impulse_noise(img: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    """Salt and pepper: a share ``s`` of the pixels set to 0 or 1 (half each)."""
    x = _f(img).copy()
    hit = rng.uniform(size=img.shape[:2]) < s
    salt = rng.uniform(size=img.shape[:2]) < 0.5
    x[hit & salt] = 1.0
    x[hit & ~salt] = 0.0
    return _u8(x)


def shot_noise(img: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson noise at ``s`` photons per unit intensity (fewer photons = more noise)."""
    return _u8(rng.poisson(_f(img) * s) / s)


def gaussian_blur(img: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur with an odd kernel size ``s``; sigma from OpenCV's rule 0.3((k-1)/2 - 1) + 0.8."""
    import torch
    from torchvision.transforms.functional import gaussian_blur as blur

    k = int(s) | 1
    sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8
    t = torch.from_numpy(_f(img)).permute(2, 0, 1)[None].float()
    return _u8(blur(t, [k, k], [sigma, sigma])[0].permute(1, 2, 0).double().numpy())


def brightness(img: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    return _back(ImageEnhance.Brightness(_pil(img)).enhance(s), img)


def contrast(img: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    return _back(ImageEnhance.Contrast(_pil(img)).enhance(s), img)


def gamma(img: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    return _u8(_f(img) ** s)


def pixelate(img: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    """Down-sample to a share ``s`` of the side (box filter), then back up (nearest)."""
    h, w = img.shape[:2]
    im = _pil(img)
    small = im.resize((max(1, int(w * s)), max(1, int(h * s))), Image.BOX)
    return _back(small.resize((w, h), Image.NEAREST), img)


def jpeg_compression(img: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    buf = io.BytesIO()
    _pil(img).save(buf, format="JPEG", quality=int(s))
    buf.seek(0)
    with Image.open(buf) as im:
        return _back(im.convert("L" if img.shape[-1] == 1 else "RGB"), img)


CORRUPTIONS: dict[str, Callable[[np.ndarray, float, np.random.Generator], np.ndarray]] = {
    "pixelate": pixelate, "jpeg_compression": jpeg_compression, "gaussian_noise": gaussian_noise,
    "speckle_noise": speckle_noise, "impulse_noise": impulse_noise, "shot_noise": shot_noise,
    "gaussian_blur": gaussian_blur, "brightness_up": brightness, "brightness_down": brightness,
    "contrast_up": contrast, "contrast_down": contrast, "gamma_corr_up": gamma, "gamma_corr_down": gamma,
}


def check_table(table: Mapping[str, Sequence[float]], key: str = "shift.corruptions") -> dict[str, list[float]]:
    """``{corruption: [5 severity parameters]}`` checked against the known corruptions.

    Raises:
        ValueError: naming the unknown corruption or the row without five parameters.
    """
    out = {}
    for name, params in table.items():
        if name not in CORRUPTIONS:
            raise ValueError(f"{key}.{name}: unknown corruption; choose from {sorted(CORRUPTIONS)}")
        try:
            p = [float(v) for v in params]
        except (TypeError, ValueError):
            p = []
        if len(p) < 5:
            raise ValueError(f"{key}.{name}: expected 5 severity parameters (severity 1..5), got {p}")
        out[name] = p[:5]
    if not out:
        raise ValueError(f"{key} is empty: name at least one corruption")
    return out


def corrupt(img: np.ndarray, name: str, param: float, seed: int) -> np.ndarray:
    """One uint8 H×W×C image corrupted by ``name`` at parameter ``param`` (noise drawn from ``seed``)."""
    return CORRUPTIONS[name](img, param, np.random.default_rng(seed)).astype(np.uint8)


def describe(table: Mapping[str, Sequence[float]]) -> dict[str, Any]:
    return {"source": "MedMNIST-C (Di Salvo et al. 2024) definitions and chest X-ray severity parameters, "
                      "re-implemented (medtrust/data/corruptions.py)", "parameters": {k: list(v) for k, v in table.items()}}
