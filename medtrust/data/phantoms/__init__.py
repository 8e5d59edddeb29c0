"""Procedural phantom data sets with known ground truth (the embedded defaults)."""
from __future__ import annotations

import hashlib

import numpy as np


def seeded_rng(*keys: object) -> np.random.Generator:
    """A generator determined by ``keys`` alone (e.g. ``(seed, "derm", index)``), so every image
    or patient of a phantom is reproducible on its own, whatever else is generated."""
    digest = hashlib.sha256(":".join(map(str, keys)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def patient_of_image(n_images: int, max_per_patient: int, *keys: object) -> list[int]:
    """Group images 0..n-1 into consecutive patients of 1..``max_per_patient`` images each."""
    rng = seeded_rng(*keys)
    out, patient, left = [], -1, 0
    for _ in range(n_images):
        if left == 0:
            patient += 1
            left = int(rng.integers(1, max_per_patient + 1))
        left -= 1
        out.append(patient)
    return out
