"""Procedural dermoscopy-like phantom: RGB skin-lesion images with exact masks.

Every image is rendered from its own seed ``(seed, index)``, so image *i* is the same whatever
``n_images`` is, and the ground truth (lesion mask, skin tone, distractors) is known exactly.
Rendering is vectorised numpy; 1,000 images at 128 px take a few seconds on one core.

What varies: lesion shape (ellipse plus radial harmonics = border irregularity), size, position,
colour and contrast, multi-colour lesions (inner blobs of another pigment), border sharpness, skin
tone (six Fitzpatrick-like groups), skin texture, illumination gradient, hair strands and rulers
drawn over the lesion (the mask is the lesion under them, as in ISIC), and the dermatoscope's dark
circular vignette.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter, zoom

from medtrust.data.phantoms import patient_of_image, seeded_rng
from medtrust.data.records import Record

# Skin base colours (RGB, 0-1) for six Fitzpatrick-like groups, light to dark.
SKIN_TONES = {
    "I": (0.96, 0.82, 0.74), "II": (0.91, 0.73, 0.61), "III": (0.82, 0.62, 0.48),
    "IV": (0.67, 0.47, 0.33), "V": (0.48, 0.32, 0.22), "VI": (0.32, 0.21, 0.15),
}
# Lesion pigments: light brown, brown, dark brown, near black, blue-grey, reddish.
PIGMENTS = np.array([
    (0.62, 0.42, 0.28), (0.45, 0.28, 0.17), (0.30, 0.18, 0.11),
    (0.15, 0.10, 0.08), (0.38, 0.40, 0.48), (0.66, 0.34, 0.30),
])


_rng = seeded_rng


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a random cells×cells grid upsampled with cubic splines."""
    grid = rng.uniform(-1, 1, (cells, cells))
    out = zoom(grid, size / cells, order=3, mode="reflect")[:size, :size]
    return np.clip(out, -1.5, 1.5)


def _draw_curves(canvas: np.ndarray, pts: np.ndarray, width: float) -> None:
    """Stamp points (N×2, pixel coords) into ``canvas`` with a disc of radius ``width``/2."""
    size = canvas.shape[0]
    r = max(0, int(np.ceil(width / 2)) - 1)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            yy = np.clip(np.round(pts[:, 0]).astype(int) + dy, 0, size - 1)
            xx = np.clip(np.round(pts[:, 1]).astype(int) + dx, 0, size - 1)
            canvas[yy, xx] = 1.0


def render_derm(
    seed: int,
    index: int,
    size: int = 128,
    skin_tone: str = "II",
    hair_prob: float = 0.4,
    ruler_prob: float = 0.15,
    vignette_prob: float = 0.5,
    multicolour_prob: float = 0.35,
    irregularity: float = 0.25,
    radius_range: Sequence[float] = (0.2, 0.6),
    contrast_range: Sequence[float] = (0.3, 0.9),
) -> tuple[np.ndarray, np.ndarray, dict[str, object]]:
    """Render one phantom image.

    Args:
        seed: data-set seed.
        index: image index; with ``seed`` it fixes every random draw of this image.
        size: side length in pixels.
        skin_tone: key of :data:`SKIN_TONES`.
        hair_prob, ruler_prob, vignette_prob, multicolour_prob: probabilities of each feature.
        irregularity: scale of the border's radial harmonics (0 = smooth ellipse).
        radius_range: lesion radius as a fraction of the half-width.
        contrast_range: how far the lesion colour moves from skin towards its pigment.

    Returns:
        ``(image, mask, info)``: uint8 H×W×3, uint8 H×W in {0,1}, and a dict of the drawn factors.
    """
    rng = _rng(seed, "derm", index)
    lin = np.linspace(-1, 1, size)
    yy, xx = np.meshgrid(lin, lin, indexing="ij")

    # Skin: base tone with per-image jitter, mottled low-frequency texture and fine grain.
    skin = np.array(SKIN_TONES[skin_tone]) * rng.uniform(0.93, 1.05, 3)
    mottle = _smooth_noise(rng, size, 6)[..., None] * 0.035
    grain = rng.normal(0, 0.012, (size, size, 1))
    img = np.clip(skin + mottle + grain, 0, 1)

    # Lesion shape: rotated ellipse with random radial harmonics (border irregularity).
    cy, cx = rng.uniform(-0.3, 0.3, 2)
    r0 = rng.uniform(*radius_range)
    aspect = rng.uniform(0.6, 1.0)
    theta0 = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(theta0) + dy * np.sin(theta0)
    v = (-dx * np.sin(theta0) + dy * np.cos(theta0)) / aspect
    rho, phi = np.hypot(u, v), np.arctan2(v, u)
    irr = irregularity * rng.uniform(0.2, 1.6)
    radius = np.ones_like(phi)
    for k in range(2, 8):
        radius += irr * rng.uniform(0, 1) / k * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    radius *= r0
    mask = rho <= radius

    # Lesion colour: a pigment blended toward skin by the contrast factor, plus reticular texture.
    contrast = rng.uniform(*contrast_range)
    # Pigment is scaled by skin luminance so lesions stay darker than the skin on every tone.
    lum = float(skin.mean()) / 0.75
    pigment = PIGMENTS[rng.integers(0, 4)] * lum
    colour = skin * (1 - contrast) + pigment * contrast
    lesion = colour + _smooth_noise(rng, size, 12)[..., None] * 0.04 * contrast
    multicolour = bool(rng.uniform() < multicolour_prob)
    if multicolour:
        for _ in range(rng.integers(1, 4)):
            by, bx = cy + rng.normal(0, 0.5) * r0 * 0.5, cx + rng.normal(0, 0.5) * r0 * 0.5
            br = r0 * rng.uniform(0.2, 0.55)
            blob = np.exp(-(((yy - by) ** 2 + (xx - bx) ** 2) / (2 * br**2)))[..., None]
            other = skin * (1 - contrast) + PIGMENTS[rng.integers(0, len(PIGMENTS))] * lum * contrast
            lesion = lesion * (1 - 0.8 * blob) + other * 0.8 * blob
    # Soft border: alpha is 0.5 exactly on the mask boundary (so the mask is the truth).
    width = rng.uniform(0.004, 0.035)
    alpha = 1 / (1 + np.exp(-(radius - rho) / width))
    img = img * (1 - alpha[..., None]) + np.clip(lesion, 0, 1) * alpha[..., None]

    # Illumination gradient.
    g = rng.uniform(-0.08, 0.08, 2)
    img = img * (1 + g[0] * yy + g[1] * xx)[..., None]

    # Hair: dark quadratic Bezier strands across the image (over the lesion too).
    n_hair = int(rng.integers(1, 9)) if rng.uniform() < hair_prob else 0
    if n_hair:
        hair = np.zeros((size, size))
        t = np.linspace(0, 1, size * 3)[:, None]
        for _ in range(n_hair):
            p0, p1, p2 = rng.uniform(-0.2, 1.2, (3, 2)) * size
            pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
            _draw_curves(hair, pts, width=rng.uniform(1, 2.5) * size / 128)
        hair = gaussian_filter(hair, 0.5)[..., None]
        img = img * (1 - 0.85 * np.clip(hair * 1.5, 0, 1)) + 0.08 * np.clip(hair, 0, 1)

    # Ruler: a straight dark line near one edge with tick marks.
    has_ruler = bool(rng.uniform() < ruler_prob)
    if has_ruler:
        ruler = np.zeros((size, size))
        pos = rng.uniform(0.05, 0.15) * size
        side = rng.integers(0, 4)
        line = np.linspace(0.1 * size, 0.9 * size, size * 2)
        pts = np.stack([np.full_like(line, pos), line], 1)
        ticks = [np.stack([pos + np.linspace(0, 0.05 * size, 8), np.full(8, x)], 1)
                 for x in np.arange(0.1 * size, 0.9 * size, 0.05 * size)]
        pts = np.concatenate([pts, *ticks])
        _draw_curves(ruler, pts, width=1.5 * size / 128)
        ruler = np.rot90(ruler, side)
        img = img * (1 - 0.7 * ruler[..., None])

    # Dermatoscope vignette: dark outside a circle with a soft rim, plus mild radial falloff.
    has_vignette = bool(rng.uniform() < vignette_prob)
    rr = np.hypot(yy, xx)
    if has_vignette:
        rim = rng.uniform(0.95, 1.25)
        dark = 1 / (1 + np.exp(-(rr - rim) / 0.04))
        img = img * (1 - 0.9 * dark[..., None])
    img = img * (1 - 0.12 * rr**2)[..., None]

    img8 = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    info = {
        "radius": float(r0), "contrast": float(contrast), "irregularity": float(irr),
        "multicolour": multicolour, "n_hair": n_hair, "ruler": has_ruler, "vignette": has_vignette,
    }
    return img8, mask.astype(np.uint8), info


class PhantomDermSource:
    """Embedded default data set: seeded procedural skin-lesion images with exact masks.

    Images are grouped into patients of 1-3 lesions; skin tone, sex and age group are
    patient-level attributes (prevalence configurable) so that splits and audits have real
    patient structure. ``label`` is 1 for "suspicious" lesions (irregular border or multi-colour),
    usable later by the classifier.

    Args:
        n_images: number of images.
        size: rendered side length (pixels); the datamodule resizes to its working size.
        seed: data-set seed (independent of the training seed if you want).
        skin_tone_probs: prevalence of each skin-tone group (keys of :data:`SKIN_TONES`).
        hair_prob, ruler_prob, vignette_prob, multicolour_prob, irregularity, radius_range,
        contrast_range: see :func:`render_derm`.
        max_images_per_patient: patients have 1..this many images.
    """

    def __init__(
        self,
        n_images: int = 400,
        size: int = 128,
        seed: int = 0,
        skin_tone_probs: dict[str, float] | None = None,
        hair_prob: float = 0.4,
        ruler_prob: float = 0.15,
        vignette_prob: float = 0.5,
        multicolour_prob: float = 0.35,
        irregularity: float = 0.25,
        radius_range: Sequence[float] = (0.2, 0.6),
        contrast_range: Sequence[float] = (0.3, 0.9),
        max_images_per_patient: int = 3,
    ) -> None:
        if n_images < 1:
            raise ValueError(f"data.source.n_images must be >= 1, got {n_images}")
        if size < 16:
            raise ValueError(f"data.source.size must be >= 16 pixels, got {size}")
        probs = dict(skin_tone_probs or {"I": 0.15, "II": 0.3, "III": 0.25, "IV": 0.15, "V": 0.1, "VI": 0.05})
        unknown = set(probs) - set(SKIN_TONES)
        if unknown:
            raise ValueError(f"data.source.skin_tone_probs: unknown groups {sorted(unknown)}; allowed {list(SKIN_TONES)}")
        total = sum(probs.values())
        if total <= 0 or any(p < 0 for p in probs.values()):
            raise ValueError(f"data.source.skin_tone_probs must be non-negative with a positive sum, got {probs}")
        self.n_images, self.size, self.seed = int(n_images), int(size), int(seed)
        self.tones = list(probs)
        self.tone_p = np.array([probs[t] / total for t in self.tones])
        self.render_kwargs = dict(
            hair_prob=hair_prob, ruler_prob=ruler_prob, vignette_prob=vignette_prob,
            multicolour_prob=multicolour_prob, irregularity=irregularity,
            radius_range=tuple(radius_range), contrast_range=tuple(contrast_range),
        )
        self.max_per_patient = int(max_images_per_patient)

    def describe(self) -> str:
        return f"phantom_derm(n={self.n_images}, size={self.size}, seed={self.seed})"

    def records(self) -> list[Record]:
        """Render all images and return their records (with in-memory arrays)."""
        patients = patient_of_image(self.n_images, self.max_per_patient, self.seed, "derm-patients")
        out: list[Record] = []
        for i, patient in enumerate(patients):
            if i == 0 or patient != patients[i - 1]:
                prng = _rng(self.seed, "derm-patient", patient)
                tone = str(prng.choice(self.tones, p=self.tone_p))
                attrs = {
                    "skin_tone": tone,
                    "sex": str(prng.choice(["F", "M"])),
                    "age_group": str(prng.choice(["<40", "40-60", ">60"])),
                }
            img, mask, info = render_derm(self.seed, i, self.size, skin_tone=tone, **self.render_kwargs)
            label = int(info["multicolour"] or info["irregularity"] > 0.3)
            out.append({
                "id": f"derm_{i:05d}", "path": f"phantom_derm://{self.seed}/{i}", "mask_path": None,
                "image": img, "mask": mask, "label": label, "patient_id": f"P{patient:05d}",
                "split": None, "attrs": dict(attrs),
            })
        return out


def export_isic_layout(root: str | Path, n_train: int, n_val: int, n_test: int, size: int = 128, seed: int = 0) -> Path:
    """Write phantom images in the official ISIC 2018 Task 1 folder layout (JPEG inputs,
    ``*_segmentation.png`` ground truth). Used by tests and to try the ``glassbox_*`` experiments
    without the real ISIC download.

    Returns:
        ``root``.
    """
    root = Path(root)
    src = PhantomDermSource(n_images=n_train + n_val + n_test, size=size, seed=seed)
    recs = src.records()
    parts = {"Training": recs[:n_train], "Validation": recs[n_train:n_train + n_val], "Test": recs[n_train + n_val:]}
    k = 0
    for part, rs in parts.items():
        inp = root / f"ISIC2018_Task1-2_{part}_Input"
        gt = root / f"ISIC2018_Task1_{part}_GroundTruth"
        inp.mkdir(parents=True, exist_ok=True)
        gt.mkdir(parents=True, exist_ok=True)
        for r in rs:
            name = f"ISIC_{k:07d}"
            k += 1
            Image.fromarray(r["image"]).save(inp / f"{name}.jpg", quality=95)
            Image.fromarray(r["mask"] * 255).save(gt / f"{name}_segmentation.png")
    return root
