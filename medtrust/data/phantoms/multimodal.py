"""Procedural multimodal phantom for text-conditioned generation (MINIM's modalities).

Five modalities, each with one finding that is drawn present or absent, on one side and at one of
two sizes, and report text written from what is drawn:

============  =====================  ==============================  ===========================
name          display name           anatomy                         finding
============  =====================  ==============================  ===========================
``cxr``       chest X-ray            body, lungs, heart, ribs        opacity (upper / lower lung)
``ct``        chest CT               body ellipse, lungs, spine      nodule (lung)
``mri``       brain MRI              skull, cortex, ventricles       lesion (hemisphere)
``fundus``    fundus photograph      orange disc, optic disc, vessels haemorrhage (retina)
``oct``       retinal OCT            layered retina, foveal pit      fluid (macula)
============  =====================  ==============================  ===========================

Sides: CXR, CT and MRI follow the radiological convention (the patient's right is on the image's
left); fundus and OCT name the image side. ``label`` is 0 = no finding, 1 = finding on the left,
2 = on the right (as named in the text), so the finding classifier of the generation evaluation is
checked against what a prompt asked for. Every image carries ``sex`` and ``age_group`` (and the
age in years in the report template); sex changes body size on CXR/CT only a little, so the
attributes are visible in neither the label nor the finding. Image *i* depends only on ``(seed, i)``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.ndimage import gaussian_filter, zoom

from medtrust.data.phantoms import patient_of_image, seeded_rng
from medtrust.data.prompts import finding_fields, render_prompt, template_text
from medtrust.data.records import Record

MODALITIES: dict[str, dict[str, str]] = {
    "cxr": {"display": "chest X-ray", "finding": "opacity"},
    "ct": {"display": "chest CT", "finding": "nodule"},
    "mri": {"display": "brain MRI", "finding": "lesion"},
    "fundus": {"display": "fundus photograph", "finding": "haemorrhage"},
    "oct": {"display": "retinal OCT", "finding": "fluid"},
}
SIDES = ("left", "right")
SIZES = ("small", "large")
RADIOLOGICAL = ("cxr", "ct", "mri")
AGE_GROUPS = (("<40", 18, 39), ("40-65", 40, 65), (">65", 66, 90))


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    lin = np.linspace(-1, 1, size)
    return np.meshgrid(lin, lin, indexing="ij")  # yy, xx


def _noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    return zoom(rng.uniform(-1, 1, (cells, cells)), size / cells, order=1)[:size, :size]


def _image_x(modality: str, side: str) -> float:
    """The sign of x (image left = -1) where a finding on ``side`` (as the text names it) is drawn."""
    s = -1.0 if side == "left" else 1.0
    return -s if modality in RADIOLOGICAL else s


def _blob(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))


def _gray(img: np.ndarray) -> np.ndarray:
    return np.repeat(np.clip(img, 0, 1)[..., None], 3, axis=2)


def render(modality: str, seed: int, index: int, size: int, present: bool, side: str, big: bool,
           region: str, body: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One image: ``(uint8 H×W×3, finding mask uint8 H×W)``; the mask is empty when absent."""
    rng = seeded_rng(seed, "mm", modality, index)
    yy, xx = _grid(size)
    sx = _image_x(modality, side)
    r = (0.16 if big else 0.08) * rng.uniform(0.9, 1.1)
    tex = _noise(rng, size, 12)
    if modality == "cxr":
        s = body * rng.uniform(0.95, 1.05)
        torso = 1 / (1 + np.exp(-(0.95 * s - np.abs(xx) * (1 + 0.2 * yy)) / 0.05))
        lungs = np.zeros_like(xx)
        for k in (-1, 1):
            lungs = np.maximum(lungs, ((xx - k * 0.38 * s) / (0.26 * s)) ** 2 + ((yy + 0.05) / (0.55 * s)) ** 2 <= 1)
        img = 0.15 + 0.45 * torso - 0.32 * gaussian_filter(lungs.astype(float), size / 60)
        img += 0.3 * np.exp(-(((xx - 0.12 * s) / (0.22 * s)) ** 2 + ((yy - 0.3) / (0.25 * s)) ** 2) * 2)
        for k in range(8):
            curve = -0.62 + k * 0.16 * s + 0.25 * (np.abs(xx) / s) ** 2
            img += 0.06 * np.exp(-((yy - curve) / 0.02) ** 2) * (np.abs(xx) < 0.75 * s) * (np.abs(xx) > 0.05)
        img += 0.12 * np.exp(-(xx / 0.07) ** 2) * torso + 0.03 * tex
        cy, cx = (-0.3 if region == "upper lung" else 0.25) + rng.normal(0, 0.04), sx * 0.38 * s + rng.normal(0, 0.03)
        lesion = _blob(yy, xx, cy, cx, r) * lungs
        img = img + 0.45 * lesion if present else img
        out = _gray(img)
    elif modality == "ct":
        a, b = 0.9 * body, 0.62 * body
        torso = ((xx / a) ** 2 + ((yy - 0.05) / b) ** 2 <= 1).astype(float)
        lungs = np.zeros_like(xx)
        for k in (-1, 1):
            lungs = np.maximum(lungs, ((xx - k * 0.4 * a) / (0.3 * a)) ** 2 + ((yy - 0.0) / (0.42 * b * 1.3)) ** 2 <= 1)
        img = 0.05 + 0.5 * gaussian_filter(torso, 0.6) - 0.45 * gaussian_filter(lungs, 0.6)
        img += 0.45 * ((xx / 0.09) ** 2 + ((yy - 0.5 * b) / 0.08) ** 2 <= 1)  # vertebra
        img += 0.25 * np.exp(-(((xx - 0.1) / 0.2) ** 2 + ((yy - 0.1) / 0.18) ** 2))  # mediastinum
        img += 0.3 * (np.abs(yy - 0.75) < 0.02) * (np.abs(xx) < 0.95)  # table
        img += 0.03 * tex * torso
        cy, cx = rng.normal(0, 0.08), sx * 0.4 * a + rng.normal(0, 0.03)
        lesion = (_blob(yy, xx, cy, cx, 0.7 * r) > 0.5).astype(float) * lungs
        img = img + 0.55 * gaussian_filter(lesion, 0.7) if present else img
        out = _gray(img)
    elif modality == "mri":
        head = (xx / 0.75) ** 2 + (yy / 0.9) ** 2
        skull = ((head <= 1) & (head > 0.8)).astype(float)
        brain = (head <= 0.8).astype(float)
        img = 0.02 + 0.55 * gaussian_filter(skull, 0.8) + 0.35 * gaussian_filter(brain, 0.8)
        gyri = np.abs(_noise(rng, size, 9) + 0.5 * _noise(rng, size, 17))
        img += 0.12 * brain * (gyri * (head > 0.35)) + 0.03 * tex * brain  # cortex folds
        vent = sum(((xx - k * 0.12) / 0.08) ** 2 + ((yy + 0.05) / 0.25) ** 2 <= 1 for k in (-1, 1)).astype(float)
        img -= 0.25 * gaussian_filter(vent, 0.8)
        img -= 0.15 * np.exp(-(xx / 0.02) ** 2) * brain  # falx
        cy, cx = rng.uniform(-0.35, 0.35), sx * 0.42 + rng.normal(0, 0.04)
        lesion = _blob(yy, xx, cy, cx, 0.8 * r) * brain
        img = img + 0.5 * lesion if present else img
        out = _gray(img)
    elif modality == "fundus":
        rad = np.sqrt(xx ** 2 + yy ** 2)
        disc = (rad <= 0.92).astype(float)
        vign = np.clip(1 - 0.5 * rad ** 2, 0, 1) * gaussian_filter(disc, 1.0)
        col = np.stack([0.85 * vign, 0.38 * vign, 0.15 * vign], axis=-1)
        od_x = 0.45 * (1 if index % 2 else -1)  # optic disc: left or right eye
        od = _blob(yy, xx, 0.0, od_x, 0.09)
        col += np.stack([0.15 * od, 0.5 * od, 0.3 * od], axis=-1)
        ang = np.arctan2(yy, xx - od_x)
        dist = np.sqrt(yy ** 2 + (xx - od_x) ** 2)
        vessels = np.zeros_like(xx)
        for k in range(5):
            theta = rng.uniform(-np.pi, np.pi)
            vessels = np.maximum(vessels, np.exp(-((np.angle(np.exp(1j * (ang - theta)))) * dist / 0.015) ** 2)
                                 * (dist > 0.1))
        col -= 0.25 * vessels[..., None] * disc[..., None] * np.array([0.2, 1.0, 1.0])
        col += 0.03 * tex[..., None] * disc[..., None]
        cy, cx = rng.uniform(-0.35, 0.35), sx * 0.45 + rng.normal(0, 0.04)
        lesion = _blob(yy, xx, cy, cx, 0.8 * r) * disc
        if present:
            col = col * (1 - 0.8 * lesion[..., None]) + lesion[..., None] * np.array([0.35, 0.0, 0.0])
        out = np.clip(col, 0, 1)
    elif modality == "oct":
        surface = -0.15 + 0.12 * np.exp(-(xx / 0.18) ** 2) + 0.05 * np.sin(2 * xx + rng.uniform(0, 6))
        depth = yy - surface
        layers = np.zeros_like(xx)
        for d, amp in ((0.03, 0.9), (0.18, 0.45), (0.33, 0.55), (0.5, 0.95)):
            layers += amp * np.exp(-((depth - d) / 0.035) ** 2)
        retina = ((depth > 0) & (depth < 0.55)).astype(float)
        choroid = ((depth >= 0.55) & (depth < 0.85)).astype(float)
        speckle = np.abs(rng.normal(0, 1, xx.shape))
        img = 0.03 + layers + 0.2 * retina + 0.25 * choroid * (0.5 + 0.5 * tex) + 0.06 * speckle * (depth > -0.02)
        cy, cx = surface + 0.26, sx * 0.45 + rng.normal(0, 0.04)
        lesion = (((xx - cx) / (1.6 * r)) ** 2 + ((yy - cy) / (0.7 * r)) ** 2 <= 1).astype(float)
        img = img * (1 - 0.85 * gaussian_filter(lesion, 0.6)) if present else img
        out = _gray(gaussian_filter(img, 0.4))
    else:
        raise ValueError(f"unknown modality {modality!r}; expected one of {sorted(MODALITIES)}")
    mask = ((lesion > 0.3) if present else np.zeros_like(xx, bool)).astype(np.uint8)
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8), mask


def _choice(rng: np.random.Generator, probs: Mapping[str, float]) -> str:
    keys = list(probs)
    p = np.array([float(probs[k]) for k in keys])
    return str(rng.choice(keys, p=p / p.sum()))


class PhantomMultimodalSource:
    """Embedded multimodal data set with report text written from what is drawn.

    Args:
        n_images: number of images (modalities take turns, so their counts differ by at most 1).
        size: rendered side length.
        seed: data-set seed.
        modalities: which of :data:`MODALITIES` to draw, in the order of ``data.modalities``
            (the records' ``modality`` indexes this list).
        prevalence: probability that an image shows its modality's finding.
        template: prompt template name (``short``, ``report``) or a format string
            (:mod:`medtrust.data.prompts`).
        attributes: ``sex`` / ``age_group`` prevalences.
        max_images_per_patient: patients have 1..this many images (same modality).
        quality: share of each acquisition grade (``{good: 0.5, fair: 0.3, poor: 0.2}``): fair and poor
            images are washed out (:mod:`medtrust.data.phantoms.quality`); the grade is the record's
            ``quality`` (3 good, 2 fair, 1 poor), never in the text. ``None``: every image is good.
        label: ``side`` (0 no finding, 1 on the left, 2 on the right, as the text names it) or ``present``
            (0 / 1: a finding classifier, e.g. the audit's independent one).

    Raises:
        ValueError: unknown modality, bad prevalence, template or quality shares.
    """

    def __init__(self, n_images: int = 1500, size: int = 64, seed: int = 0,
                 modalities: Sequence[str] = tuple(MODALITIES), prevalence: float = 0.6,
                 template: str = "short", attributes: Mapping[str, Mapping[str, float]] | None = None,
                 max_images_per_patient: int = 2, quality: Mapping[str, float] | None = None,
                 label: str = "side") -> None:
        from medtrust.data.phantoms.quality import check_quality_mix

        self.quality = check_quality_mix(quality)
        if label not in ("side", "present"):
            raise ValueError(f"data.source.label={label!r}; expected side (0 none, 1 left, 2 right) or present (0 / 1)")
        self.label_mode = str(label)
        self.modalities = [str(m) for m in modalities]
        unknown = [m for m in self.modalities if m not in MODALITIES]
        if unknown or not self.modalities:
            raise ValueError(f"data.modalities: {unknown or 'empty'}; expected names of {list(MODALITIES)}")
        if not 0 <= float(prevalence) <= 1:
            raise ValueError(f"data.source.prevalence must be in [0, 1], got {prevalence}")
        if n_images < 1 or size < 16:
            raise ValueError(f"data.source.n_images >= 1 and size >= 16 needed, got {n_images}, {size}")
        template_text(template)  # fail fast on unknown fields
        self.n_images, self.size, self.seed = int(n_images), int(size), int(seed)
        self.prevalence, self.template = float(prevalence), str(template)
        self.attrs = {"sex": {"F": 0.5, "M": 0.5}, "age_group": {"<40": 0.3, "40-65": 0.4, ">65": 0.3},
                      **{k: dict(v) for k, v in (attributes or {}).items()}}
        self.max_per_patient = int(max_images_per_patient)

    def describe(self) -> str:
        q = f", quality={self.quality}" if self.quality else ""
        return (f"phantom_multimodal(n={self.n_images}, size={self.size}, seed={self.seed}, "
                f"modalities={self.modalities}, template={self.template}{q})")

    def truth(self, i: int, patient: str) -> dict[str, object]:
        """What image ``i`` shows (drawn from its own seeded stream) and its patient's attributes."""
        m = self.modalities[i % len(self.modalities)]
        rng = seeded_rng(self.seed, "mm-truth", i)
        prng = seeded_rng(self.seed, "mm-patient", patient)
        sex = _choice(prng, self.attrs["sex"])
        group = _choice(prng, self.attrs["age_group"])
        lo, hi = next(((a, b) for g, a, b in AGE_GROUPS if g == group), (18, 90))
        present = bool(rng.uniform() < self.prevalence)
        side, size = SIDES[int(rng.integers(2))], SIZES[int(rng.integers(2))]
        region = {"cxr": ("upper lung", "lower lung")[int(rng.integers(2))], "ct": "lung", "mri": "hemisphere",
                  "fundus": "retina", "oct": "macula"}[m]
        return {"modality": m, "present": present, "side": side, "size": size, "region": region, "sex": sex,
                "age_group": group, "age": int(prng.integers(lo, hi + 1)),
                "body": (0.93 if sex == "F" else 1.03) * float(prng.uniform(0.95, 1.05))}

    def records(self) -> list[Record]:
        # patients are grouped per modality, so a patient's images share a modality
        per_mod = {m: [i for i in range(self.n_images) if i % len(self.modalities) == k]
                   for k, m in enumerate(self.modalities)}
        patient_of: dict[int, str] = {}
        for m, idx in per_mod.items():
            for i, p in zip(idx, patient_of_image(len(idx), self.max_per_patient, self.seed, "mm-groups", m)):
                patient_of[i] = f"{m}{p:05d}"
        out: list[Record] = []
        for i in range(self.n_images):
            pid = patient_of[i]
            t = self.truth(i, pid)
            m = str(t["modality"])
            img, mask = render(m, self.seed, i, self.size, bool(t["present"]), str(t["side"]),
                               t["size"] == "large", str(t["region"]), float(t["body"]))  # type: ignore[arg-type]
            info = MODALITIES[m]
            fields = finding_fields(info["display"], info["finding"], bool(t["present"]), str(t["side"]),
                                    str(t["region"]), str(t["size"]), str(t["sex"]), int(t["age"]))  # type: ignore[arg-type]
            label = 0 if not t["present"] else 1 if self.label_mode == "present" else 1 + SIDES.index(str(t["side"]))
            extra: dict[str, object] = {}
            if self.quality:
                from medtrust.data.phantoms.quality import GRADES, draw_grade, wash_out

                grade, strength = draw_grade(self.quality, self.seed, "mm-quality", i)
                img = wash_out(img, strength) if strength > 0 else img
                extra = {"quality": GRADES[grade], "quality_strength": strength}
            out.append({
                "id": f"mm_{i:05d}", "path": f"phantom_multimodal://{self.seed}/{i}", "mask_path": None,
                "image": img, "mask": mask, "label": label, "patient_id": pid, "split": None,
                "text": render_prompt(self.template, fields), "modality": self.modalities.index(m),
                "attrs": {"sex": str(t["sex"]), "age_group": str(t["age_group"]), "modal": m,
                          "finding": "present" if t["present"] else "absent",
                          "side": str(t["side"]) if t["present"] else "none",
                          "size": str(t["size"]) if t["present"] else "none"},
                **extra,
            })
        return out
