"""Image quality with a known truth, for MINIM's selector and rating-driven fine-tuning.

MINIM trains on *all* data first, then a selector filters low-quality outputs and ratings drive
further optimisation. To measure that loop, the multimodal phantom can draw a known share of
**washed-out acquisitions** (``data.source.quality``): the image is blended towards its own mean
intensity, so it keeps its anatomy and finding but loses contrast (a common reason radiographs are
rejected and repeated). The prompt never mentions it, so a generator trained on all the data learns
to produce washed-out images at about the training share, and only a rating can tell it apart.

The **known quality function** (:class:`PhantomQualityRater`) measures any image, real or generated:
its contrast ratio ``c`` = the standard deviation of its luminance / the median of the same on clean
phantom images of its modality (rendered here, never the training data). Grades:

======  ========  ==========================  ======================
rating  grade     veil strength drawn (a)     contrast ratio c
======  ========  ==========================  ======================
3       good      0.00 - 0.08                 >= 0.78
2       fair      0.35 - 0.50                 0.40 - 0.78
1       poor      0.68 - 0.80                 < 0.40
======  ========  ==========================  ======================

The thresholds are the geometric midpoints between the grades' ranges of ``c`` on real phantoms
(clean images vary by 0.89-1.14 of the median), so the function recovers the injected grade of
every real phantom image (tested). :func:`simulate_raters` turns ``c`` into the ratings of several
noisy raters (each sees ``log c`` with its own noise and bias), as a ratings CSV would hold them.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from medtrust.data.phantoms import seeded_rng

GRADES: dict[str, int] = {"good": 3, "fair": 2, "poor": 1}
# veil strength a (x -> m + (1 - a)(x - m)) drawn uniformly in these ranges
VEIL: dict[str, tuple[float, float]] = {"good": (0.0, 0.08), "fair": (0.35, 0.5), "poor": (0.68, 0.8)}
THRESHOLDS: tuple[float, float] = (0.40, 0.78)  # c below the first: 1, below the second: 2, else 3
DEFAULT_RATERS: tuple[dict[str, float], ...] = (
    {"sigma": 0.08, "bias": 0.0}, {"sigma": 0.12, "bias": 0.05}, {"sigma": 0.2, "bias": -0.05})


def check_quality_mix(mix: Mapping[str, float] | None) -> dict[str, float] | None:
    """Validate ``data.source.quality`` (grade -> share of images).

    Raises:
        ValueError: an unknown grade or shares that are negative or do not sum to 1.
    """
    if not mix:
        return None
    out = {str(k): float(v) for k, v in dict(mix).items()}
    unknown = sorted(set(out) - set(GRADES))
    if unknown:
        raise ValueError(f"data.source.quality: unknown grade(s) {unknown}; expected shares of {list(GRADES)}")
    if any(v < 0 for v in out.values()) or abs(sum(out.values()) - 1) > 1e-6:
        raise ValueError(f"data.source.quality: shares must be >= 0 and sum to 1, got {out}")
    return out


def draw_grade(mix: Mapping[str, float], *keys: object) -> tuple[str, float]:
    """The grade of one image and its veil strength, from its own seeded stream ``keys``."""
    rng = seeded_rng(*keys)
    names = list(mix)
    p = np.array([mix[n] for n in names], dtype=float)
    grade = str(names[int(rng.choice(len(names), p=p / p.sum()))])
    lo, hi = VEIL[grade]
    return grade, float(rng.uniform(lo, hi))


def wash_out(image: np.ndarray, strength: float) -> np.ndarray:
    """Blend a uint8 H×W×C image towards its per-channel mean by ``strength`` (0: unchanged)."""
    x = image.astype(np.float64)
    m = x.reshape(-1, x.shape[-1]).mean(0) if x.ndim == 3 else x.mean()
    out = m + (1.0 - float(strength)) * (x - m)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def luminance_std(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Std of the channel-mean luminance of each image: N×C×H×W in [0, 1] -> N."""
    x = torch.as_tensor(images, dtype=torch.float64)
    if x.ndim == 3:
        x = x[None]
    return x.mean(1).flatten(1).std(1, unbiased=False).numpy()


def rating_of(contrast: np.ndarray | Sequence[float], thresholds: Sequence[float] = THRESHOLDS) -> np.ndarray:
    """Ratings 1-3 from contrast ratios."""
    c = np.asarray(contrast, dtype=np.float64)
    lo, hi = (float(t) for t in thresholds)
    return np.where(c >= hi, 3, np.where(c >= lo, 2, 1)).astype(int)


class PhantomQualityRater:
    """The known quality function of the multimodal phantom.

    Args:
        modalities: modality names, in the index order of the images' ``modality``.
        size: side length of the clean reference phantoms (the images' working size).
        seed: seed of the reference phantoms (independent of any training data).
        n_reference: clean reference images per modality.
        thresholds: contrast ratios that separate ratings 1|2 and 2|3.

    Raises:
        ValueError: a modality the phantom does not draw.
    """

    def __init__(self, modalities: Sequence[str], size: int = 64, seed: int = 12345, n_reference: int = 60,
                 thresholds: Sequence[float] = THRESHOLDS) -> None:
        from medtrust.data.phantoms.multimodal import MODALITIES, PhantomMultimodalSource

        self.modalities = [str(m) for m in modalities]
        unknown = [m for m in self.modalities if m not in MODALITIES]
        if unknown:
            raise ValueError(f"PhantomQualityRater: modalities {unknown} are not phantom modalities {list(MODALITIES)}; "
                             "the known quality function exists for the phantom only")
        self.thresholds = tuple(float(t) for t in thresholds)
        if not 0 < self.thresholds[0] < self.thresholds[1]:
            raise ValueError(f"PhantomQualityRater.thresholds must be increasing and > 0, got {self.thresholds}")
        src = PhantomMultimodalSource(n_images=len(self.modalities) * int(n_reference), size=int(size), seed=int(seed),
                                      modalities=self.modalities)
        ref: dict[int, list[float]] = {i: [] for i in range(len(self.modalities))}
        for r in src.records():
            img = torch.from_numpy(r["image"]).permute(2, 0, 1).float() / 255
            ref[int(r["modality"])].append(float(luminance_std(img)[0]))
        self.reference = {self.modalities[k]: float(np.median(v)) for k, v in ref.items()}
        self.size, self.seed, self.n_reference = int(size), int(seed), int(n_reference)

    def describe(self) -> str:
        return (f"phantom contrast ratio (luminance std / median of {self.n_reference} clean phantoms of the modality, "
                f"seed {self.seed}); rating 3 if >= {self.thresholds[1]}, 2 if >= {self.thresholds[0]}, else 1")

    def contrast(self, images: torch.Tensor, modalities: Sequence[int | str]) -> np.ndarray:
        """Contrast ratio of each image (N×C×H×W in [0, 1]) against its modality's reference."""
        names = [self.modalities[int(m)] if not isinstance(m, str) else m for m in modalities]
        if len(names) != len(images):
            raise ValueError(f"{len(images)} images but {len(names)} modalities")
        unknown = sorted(set(names) - set(self.reference))
        if unknown:
            raise ValueError(f"PhantomQualityRater: no reference for modalities {unknown}; it knows {self.modalities}")
        ref = np.array([self.reference[n] for n in names])
        return luminance_std(images) / ref

    def rate(self, images: torch.Tensor, modalities: Sequence[int | str]) -> np.ndarray:
        """The known rating (1-3) of each image."""
        return rating_of(self.contrast(images, modalities), self.thresholds)


def simulate_raters(contrast: np.ndarray | Sequence[float], raters: Sequence[Mapping[str, float]] = DEFAULT_RATERS,
                    thresholds: Sequence[float] = THRESHOLDS, seed: int = 0,
                    ids: Sequence[Any] | None = None) -> pd.DataFrame:
    """Ratings of noisy raters: rater ``j`` rates ``exp(log c + N(0, sigma_j) + bias_j)``.

    Returns:
        one row per (image, rater): ``image`` (index or ``ids``), ``rater`` (``rater<j>``), ``rating``.
    """
    c = np.asarray(contrast, dtype=np.float64)
    rows = []
    for j, r in enumerate(raters):
        rng = seeded_rng(seed, "rater", j)
        seen = np.exp(np.log(np.clip(c, 1e-6, None)) + rng.normal(0, float(r.get("sigma", 0.0)), len(c))
                      + float(r.get("bias", 0.0)))
        ratings = rating_of(seen, thresholds)
        for i, v in enumerate(ratings):
            rows.append({"image": ids[i] if ids is not None else i, "rater": f"rater{j + 1}", "rating": int(v)})
    return pd.DataFrame(rows)
