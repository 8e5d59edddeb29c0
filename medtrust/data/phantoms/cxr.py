"""Procedural chest-X-ray-like phantom with known findings, patients and subgroup difficulty.

Grayscale frontal images: body, two lung fields, heart, ribs, clavicles, spine shadow; exposure and
patient size vary. Two independent findings, each with its own label and exact mask:

- ``pneumonia``: one or two focal, textured opacities inside a lung field;
- ``covid``: bilateral, peripheral, lower-zone ground-glass patches.

Every patient has demographic attributes (sex, age group, race/ethnicity) drawn with configurable
prevalence, and each attribute value can carry a *difficulty* factor that scales the contrast of
its findings (e.g. ``{"sex": {"F": 0.5}}`` makes opacities in women half as visible), so a subgroup
performance gap of known size can be injected. Image *i* depends only on ``(seed, i)``.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy.ndimage import gaussian_filter, zoom

from medtrust.data.phantoms import patient_of_image, seeded_rng
from medtrust.data.records import Record

FINDINGS = ("pneumonia", "covid")
DEFAULT_ATTRS: dict[str, dict[str, float]] = {
    "sex": {"F": 0.5, "M": 0.5},
    "age_group": {"<40": 0.3, "40-65": 0.4, ">65": 0.3},
    "race": {"A": 0.5, "B": 0.3, "C": 0.2},
}


_rng = seeded_rng


def _noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    return zoom(rng.uniform(-1, 1, (cells, cells)), size / cells, order=1)[:size, :size]


def render_cxr(seed: int, index: int, size: int, pneumonia: bool, covid: bool, contrast: float = 1.0,
               patient_scale: float = 1.0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Render one image.

    Args:
        seed, index: fix every random draw of the image.
        size: side length in pixels.
        pneumonia, covid: whether each finding is present.
        contrast: multiplies the visibility of findings (subgroup difficulty).
        patient_scale: body size (0.85-1.15).

    Returns:
        ``(image uint8 H×W, {finding: mask uint8 H×W})`` (masks are empty when absent).
    """
    rng = _rng(seed, "cxr", index)
    lin = np.linspace(-1, 1, size)
    yy, xx = np.meshgrid(lin, lin, indexing="ij")
    s = patient_scale * rng.uniform(0.95, 1.05)
    body = 1 / (1 + np.exp(-(0.95 * s - np.abs(xx) * (1 + 0.2 * yy)) / 0.05))
    img = 0.15 + 0.45 * body
    # lung fields: two tilted ellipses, dark (air)
    lungs = np.zeros_like(img)
    for side in (-1, 1):
        cx, cy = side * 0.38 * s, -0.05 + rng.normal(0, 0.02)
        a, b = 0.26 * s * rng.uniform(0.9, 1.1), 0.55 * s * rng.uniform(0.9, 1.1)
        lungs = np.maximum(lungs, ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1)
    lung_soft = gaussian_filter(lungs.astype(float), size / 60)
    img = img - 0.32 * lung_soft
    # heart: bright blob, left of centre (patient's left is image right)
    heart = np.exp(-(((xx - 0.12 * s) / (0.22 * s)) ** 2 + ((yy - 0.3) / (0.25 * s)) ** 2) * 2)
    img = img + 0.3 * heart * rng.uniform(0.8, 1.2)
    # spine, ribs, clavicles
    img = img + 0.12 * np.exp(-(xx / 0.07) ** 2) * body
    for k in range(9):
        y0 = -0.65 + k * 0.15 * s
        for side in (-1, 1):
            curve = y0 + 0.25 * (np.abs(xx) / s) ** 2 - 0.05 * side * xx
            rib = np.exp(-((yy - curve) / 0.018) ** 2) * (np.abs(xx) < 0.75 * s) * (side * xx > 0.05)
            img = img + 0.07 * rib
    for side in (-1, 1):
        clav = np.exp(-((yy - (-0.72 + 0.15 * side * xx)) / 0.02) ** 2) * (np.abs(xx) < 0.5) * (side * xx > 0)
        img = img + 0.1 * clav
    img = img + 0.03 * _noise(rng, size, 10) + rng.normal(0, 0.01, img.shape)

    masks = {f: np.zeros((size, size), np.uint8) for f in FINDINGS}
    # Findings draw from their own stream, so an image with and without a finding shares its anatomy
    # and exposure (counterfactual pairs for audits).
    exposure, gamma = rng.uniform(0.8, 1.2), rng.uniform(0.85, 1.15)
    rng = _rng(seed, "cxr-finding-shapes", index)
    severity = rng.uniform(0.15, 1.0)  # faint findings exist, so the task is not separable
    if pneumonia:
        op = np.zeros_like(img)
        for _ in range(rng.integers(1, 3)):
            side = rng.choice([-1, 1])
            cx, cy = side * 0.38 * s + rng.normal(0, 0.06), rng.uniform(-0.35, 0.35)
            r = rng.uniform(0.1, 0.2) * s
            blob = np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r**2)))
            op = np.maximum(op, blob * (0.7 + 0.3 * _noise(rng, size, 16)))
        op = op * lungs
        masks["pneumonia"] = (op > 0.35).astype(np.uint8)
        img = img + 0.25 * contrast * severity * op
    if covid:
        gg = np.zeros_like(img)
        for side in (-1, 1):
            cx, cy = side * 0.52 * s, rng.uniform(0.15, 0.35)
            blob = np.exp(-(((xx - cx) / 0.16) ** 2 + ((yy - cy) / 0.25) ** 2))
            gg = np.maximum(gg, blob)
        gg = gg * lungs * (0.6 + 0.4 * np.abs(_noise(rng, size, 24)))
        masks["covid"] = (gg > 0.3).astype(np.uint8)
        img = img + 0.18 * contrast * severity * gg
    img = np.clip(img * exposure, 0, 1) ** gamma
    return (img * 255 + 0.5).astype(np.uint8), masks


class PhantomCxrSource:
    """Embedded chest-X-ray-like data set with patient ids, demographics and two findings.

    Args:
        n_images: number of images.
        size: rendered side length.
        seed: data-set seed.
        target: finding used as ``label`` and ``mask`` (``pneumonia`` or ``covid``); the other is
            recorded in ``attrs`` (``finding_<name>``) for audits. ``finding`` gives three classes:
            0 = no finding, 1 = pneumonia-like opacity only, 2 = COVID-like pattern (with or without
            an opacity); its mask is the union of both.
        prevalence: probability of each finding per image.
        attributes: attribute -> {value: prevalence}.
        difficulty: attribute -> {value: contrast factor} (1 = normal, < 1 fainter findings).
        max_images_per_patient: patients have 1..this many images.

    Raises:
        ValueError: unknown target/finding, negative prevalence, difficulty for an unknown value.
    """

    def __init__(
        self,
        n_images: int = 600,
        size: int = 64,
        seed: int = 0,
        target: str = "pneumonia",
        prevalence: Mapping[str, float] | None = None,
        attributes: Mapping[str, Mapping[str, float]] | None = None,
        difficulty: Mapping[str, Mapping[str, float]] | None = None,
        max_images_per_patient: int = 3,
    ) -> None:
        if target not in (*FINDINGS, "finding"):
            raise ValueError(f"data.source.target must be one of {(*FINDINGS, 'finding')}, got {target!r}")
        if n_images < 1 or size < 16:
            raise ValueError(f"data.source.n_images >= 1 and size >= 16 needed, got {n_images}, {size}")
        self.prev = {"pneumonia": 0.4, "covid": 0.2, **dict(prevalence or {})}
        bad = [k for k, v in self.prev.items() if k not in FINDINGS or not 0 <= float(v) <= 1]
        if bad:
            raise ValueError(f"data.source.prevalence: {bad} must be findings {FINDINGS} with values in [0, 1]")
        self.attrs = {k: dict(v) for k, v in (attributes or DEFAULT_ATTRS).items()}
        self.difficulty = {k: dict(v) for k, v in (difficulty or {}).items()}
        for attr, vals in self.difficulty.items():
            unknown = set(vals) - set(self.attrs.get(attr, {}))
            if unknown:
                raise ValueError(f"data.source.difficulty.{attr}: values {sorted(unknown)} not in "
                                 f"data.source.attributes.{attr} {list(self.attrs.get(attr, {}))}")
        self.n_images, self.size, self.seed, self.target = int(n_images), int(size), int(seed), target
        self.max_per_patient = int(max_images_per_patient)

    def describe(self) -> str:
        return f"phantom_cxr(n={self.n_images}, size={self.size}, seed={self.seed}, target={self.target})"

    def _patient(self, p: int) -> tuple[dict[str, str], float, float]:
        rng = _rng(self.seed, "cxr-patient", p)
        attrs = {}
        for a, vals in self.attrs.items():
            keys = list(vals)
            probs = np.array([float(vals[k]) for k in keys])
            attrs[a] = str(rng.choice(keys, p=probs / probs.sum()))
        contrast = float(np.prod([self.difficulty.get(a, {}).get(v, 1.0) for a, v in attrs.items()]))
        return attrs, contrast, float(rng.uniform(0.85, 1.15))

    def records(self) -> list[Record]:
        patients = patient_of_image(self.n_images, self.max_per_patient, self.seed, "cxr-groups")
        out: list[Record] = []
        for i, p in enumerate(patients):
            if i == 0 or p != patients[i - 1]:
                attrs, contrast, scale = self._patient(p)
            frng = _rng(self.seed, "cxr-findings", i)
            has = {f: bool(frng.uniform() < float(self.prev.get(f, 0))) for f in FINDINGS}
            img, masks = render_cxr(self.seed, i, self.size, has["pneumonia"], has["covid"], contrast, scale)
            other = {f"finding_{f}": str(int(has[f])) for f in FINDINGS if f != self.target}
            if self.target == "finding":
                label, mask = (2 if has["covid"] else 1 if has["pneumonia"] else 0), masks["pneumonia"] | masks["covid"]
            else:
                label, mask = int(has[self.target]), masks[self.target]
            out.append({
                "id": f"cxr_{i:05d}", "path": f"phantom_cxr://{self.seed}/{i}", "mask_path": None,
                "image": img, "mask": mask, "label": label,
                "patient_id": f"C{p:05d}", "split": None, "attrs": {**attrs, **other},
            })
        return out
