"""DICOM and NIfTI volumes as a 2-D image source (SAFEGEN's real scans): every ``.dcm``, ``.nii`` and
``.nii.gz`` under a folder becomes its slices (:mod:`medtrust.data.volumes`: DICOM de-identified on import,
CT windowed to HU [−1000, 1000], resized with MONAI). The slices of one file are one patient (they stay in
one split); a DICOM file's kept ``PatientSex`` / ``PatientAge`` and its modality are attributes.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medtrust.data.records import DataError, Record
from medtrust.data.volumes import HU_WINDOW, read_dicom, read_nifti

VOLUME_SUFFIXES = (".dcm", ".nii", ".nii.gz")


def _kind(p: Path) -> str | None:
    name = p.name.lower()
    return next((s for s in VOLUME_SUFFIXES if name.endswith(s)), None)


class VolumeSource:
    """Records of the slices of every DICOM / NIfTI file under ``root``.

    Args:
        root: the folder searched (recursively).
        image_size: the slices' size (MONAI ``Resize``, area).
        axis, step: the slicing axis of a NIfTI volume and every ``step``-th slice (a DICOM file's frames are
            its slices).
        nifti_ct: NIfTI volumes are CT in HU (windowed) or another modality (percentile-scaled).
        window: the HU window of CT.

    Raises:
        DataError: no volume under ``root``, or a file that cannot be read (naming it).
    """

    def __init__(self, root: str, image_size: Sequence[int], axis: int = 2, step: int = 1, nifti_ct: bool = True,
                 window: Sequence[float] = HU_WINDOW) -> None:
        self.root = Path(str(root)).expanduser()
        self.size = [int(v) for v in image_size]
        self.axis, self.step, self.nifti_ct, self.window = int(axis), int(step), bool(nifti_ct), [float(w) for w in window]

    @property
    def data_root(self) -> Path:
        """The folder every file of this source must lie in (unless ``data.allow_outside_root=true``)."""
        return self.root

    def describe(self) -> str:
        return f"volumes({self.root})"

    def records(self) -> list[Record]:
        if not self.root.is_dir():
            raise DataError(f"volume folder not found: {self.root} (set data.root=<folder of .dcm / .nii / .nii.gz>)")
        files = sorted(p for p in self.root.rglob("*") if p.is_file() and _kind(p))
        if not files:
            raise DataError(f"{self.root}: no DICOM or NIfTI file ({', '.join(VOLUME_SUFFIXES)})")
        out: list[Record] = []
        for p in files:
            rel = p.relative_to(self.root).as_posix()
            try:
                if _kind(p) == ".dcm":
                    slices, meta = read_dicom(p, self.size, self.window)
                    attrs = {"modality": meta["modality"] or "?", "sex": meta["sex"] or "?", "age": meta["age"] or "?"}
                else:
                    slices, meta = read_nifti(p, self.size, self.nifti_ct, self.window, self.axis, self.step)
                    attrs = {"modality": "CT" if self.nifti_ct else "?", "sex": "?", "age": "?"}
            except ValueError as err:
                raise DataError(str(err)) from err
            for k, s in enumerate(slices):
                out.append({"id": f"{rel}#{k}", "path": str(p), "mask_path": None,
                            "image": (np.clip(s, 0, 1) * 255 + 0.5).astype(np.uint8), "mask": None, "label": None,
                            "patient_id": rel, "split": None, "attrs": dict(attrs)})
        return out
