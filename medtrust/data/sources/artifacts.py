"""Real against synthetic: any image source with SAFEGEN's artifacts injected into a share of its images,
as a binary classification source (label 1 = an injected artifact, 0 = the real image untouched) whose
mask is the artifact's exact mask (empty for real images).

It trains the project's classifier task to tell real from synthetic (SAFEGEN's "real-vs-synthetic
classifier"), so that the XAI suite's Grad-CAM and SHAP maps can be scored against where the artifact
truly is (pointing game, relevance mass). Each image appears once, either real or injected; the choice,
the cohort, the severity and the injection depend only on ``(seed, record id)``, so the set is
reproducible and a patient's images stay in one split (the inner source's patient ids are kept).

A classifier trained here has seen the artifact families it is tested on: its AUROC measures how
separable these injections are, not how a detector generalises to unseen artifacts.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medtrust.data.artifacts import COHORTS, SEVERITIES, inject
from medtrust.data.phantoms import seeded_rng
from medtrust.data.records import DataError, RealPaths, Record, load_record, outside_root


class ArtifactSource:
    """``inner``'s images at the working size, a ``fraction`` of them with one injected artifact.

    Args:
        inner: any record source (a phantom, csv, folder ... source object).
        image_size, channels: the working size and channels (the injections are made at that size).
        fraction: share of images that get an artifact (label 1).
        cohorts, severities: what is injected (drawn uniformly per image).
        seed: the injections' seed.
        resize: ``stretch`` or ``pad``, as ``data.resize``.
        allow_outside_root: read inner files outside the inner source's data root (``data.allow_outside_root``);
            False: such a file stops with its row named.

    Raises:
        ValueError: a fraction outside (0, 1), an unknown cohort or a severity outside 1-5 (naming the key).
    """

    def __init__(self, inner: Any, image_size: Sequence[int], channels: int = 1, fraction: float = 0.5,
                 cohorts: Sequence[str] = tuple(COHORTS), severities: Sequence[int] = SEVERITIES, seed: int = 0,
                 resize: str = "stretch", allow_outside_root: bool = False) -> None:
        if not 0 < float(fraction) < 1:
            raise ValueError(f"data.source.fraction={fraction!r}: expected a share in (0, 1)")
        bad = [c for c in cohorts if c not in COHORTS]
        if bad or not cohorts:
            raise ValueError(f"data.source.cohorts: unknown or no cohort(s) {bad}; expected some of {list(COHORTS)}")
        if not severities or any(int(s) != s or not 1 <= int(s) <= 5 for s in severities):
            raise ValueError(f"data.source.severities={list(severities)}: expected integers 1-5")
        self.inner, self.size, self.channels = inner, [int(v) for v in image_size], int(channels)
        self.fraction, self.seed, self.resize = float(fraction), int(seed), str(resize)
        self.cohorts, self.severities = [str(c) for c in cohorts], [int(s) for s in severities]
        self.allow_outside_root = bool(allow_outside_root)

    def describe(self) -> str:
        return (f"artifacts({self.inner.describe()}, fraction={self.fraction}, cohorts={self.cohorts}, "
                f"severities={self.severities}, seed={self.seed})")

    def records(self) -> list[Record]:
        out: list[Record] = []
        root = None if self.allow_outside_root else getattr(self.inner, "data_root", None)
        paths = RealPaths()
        for rec in self.inner.records():
            why = outside_root(rec, root, paths) if root is not None and not rec.get("error") else None
            if why:  # the inner images are read here, not by the datamodule: the same data-root rule
                raise DataError(f"{self.describe()}: {why}")
            try:
                img, _ = load_record(rec, self.size, self.channels, require_mask=False, resize=self.resize)
            except DataError as err:
                raise DataError(f"{self.describe()}: {err}") from err
            clean = img.transpose(1, 2, 0).astype(np.float32) / 255.0          # H×W×C in [0, 1]
            rng = seeded_rng(self.seed, "artifact-source", str(rec["id"]))
            attrs = dict(rec.get("attrs") or {})
            if rng.uniform() < self.fraction:
                cohort = self.cohorts[int(rng.integers(len(self.cohorts)))]
                sev = self.severities[int(rng.integers(len(self.severities)))]
                inj = inject(clean, cohort, sev, rng)
                image, mask, label = inj.image, inj.mask.astype(np.uint8), 1
                attrs.update({"cohort": cohort, "kind": inj.kind, "severity": str(sev)})
            else:
                image, mask, label = clean, np.zeros(clean.shape[:2], np.uint8), 0
                attrs.update({"cohort": "real", "kind": "real", "severity": "0"})
            out.append({"id": str(rec["id"]), "path": str(rec.get("path", rec["id"])), "mask_path": None,
                        "image": (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), "mask": mask, "label": label,
                        "patient_id": rec.get("patient_id", rec["id"]), "split": rec.get("split"), "attrs": attrs})
        if not out:
            raise DataError(f"{self.inner.describe()}: no records to inject artifacts into")
        return out
