"""DICOM and NIfTI volumes as 2-D slices (SAFEGEN's real scans), de-identified on import.

- DICOM: read with pydicom; every element that identifies a patient, a person or an institution is
  removed on import (:func:`deidentify`: the tags of :data:`PHI_KEYWORDS`, every person-name (PN)
  element at any depth, and all private tags), so nothing downstream can see them. Sex and age are
  kept (``PatientSex``, ``PatientAge``): the subgroup audits need them, and alone they do not identify.
  Pixel values go through the modality LUT (``RescaleSlope`` / ``RescaleIntercept``: Hounsfield units
  for CT).
- NIfTI: read through MONAI (``LoadImage`` with the NiBabel reader).
- CT is windowed to HU [−1000, 1000] (configurable) and scaled to [0, 1] with MONAI's
  ``ScaleIntensityRange``; other modalities are scaled between their 0.5 and 99.5 percentiles. A 3-D
  volume becomes its slices along ``axis`` (every ``step``-th), each resized to ``size`` (MONAI ``Resize``).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# PS3.15 Basic Application Level Confidentiality Profile, the attributes that name or locate a patient,
# a person or an institution, and the identifiers and dates that link a scan to them.
PHI_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "OtherPatientIDs", "OtherPatientNames", "OtherPatientIDsSequence",
    "PatientBirthDate", "PatientBirthTime", "PatientBirthName", "PatientMotherBirthName", "PatientAddress",
    "PatientTelephoneNumbers", "PatientInsurancePlanCodeSequence", "MilitaryRank", "BranchOfService",
    "MedicalRecordLocator", "EthnicGroup", "Occupation", "AdditionalPatientHistory", "PatientComments",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "InstitutionCodeSequence",
    "ReferringPhysicianName", "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
    "PerformingPhysicianName", "NameOfPhysiciansReadingStudy", "PhysiciansOfRecord", "OperatorsName",
    "RequestingPhysician", "ScheduledPerformingPhysicianName", "AccessionNumber", "StudyID", "StationName",
    "DeviceSerialNumber", "RequestAttributesSequence", "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate",
    "StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime", "AcquisitionDateTime", "InstanceCreationDate",
    "InstanceCreationTime", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID",
    "MediaStorageSOPInstanceUID", "ReferencedSOPInstanceUID", "StorageMediaFileSetUID", "RequestedProcedureID",
    "PerformedProcedureStepID", "ScheduledProcedureStepID", "ImageComments", "StudyDescription", "PatientWeight",
    "PatientSize",
)
HU_WINDOW = (-1000.0, 1000.0)


def deidentify(ds: Any) -> list[str]:
    """Remove the identifying elements of a pydicom ``Dataset`` in place; return what was removed.

    Removes :data:`PHI_KEYWORDS` (in the file meta too), every PN element at any depth and all private
    tags. ``PatientSex`` and ``PatientAge`` are kept.
    """
    removed: list[str] = []
    for kw in PHI_KEYWORDS:
        for part in (ds, getattr(ds, "file_meta", None)):
            if part is not None and kw in part:
                delattr(part, kw)
                removed.append(kw)

    def walk(d: Any) -> None:
        for elem in list(d):
            if elem.VR == "PN":
                removed.append(elem.keyword or str(elem.tag))
                del d[elem.tag]
            elif elem.VR == "SQ":
                for item in elem.value:
                    walk(item)

    walk(ds)
    n_private = sum(1 for e in ds.iterall() if e.tag.is_private)
    if n_private:
        ds.remove_private_tags()
        removed.append(f"{n_private} private tag(s)")
    return removed


def identifying_elements(ds: Any) -> list[str]:
    """What of :data:`PHI_KEYWORDS`, PN elements and private tags a dataset still holds (for tests and checks)."""
    left = [kw for kw in PHI_KEYWORDS if kw in ds or (getattr(ds, "file_meta", None) is not None and kw in ds.file_meta)]
    left += [e.keyword or str(e.tag) for e in ds.iterall() if e.VR == "PN" or e.tag.is_private]
    return left


def _scale(vol: np.ndarray, ct: bool, window: Sequence[float]) -> np.ndarray:
    from monai.transforms import ScaleIntensityRange, ScaleIntensityRangePercentiles

    if ct:
        f = ScaleIntensityRange(a_min=float(window[0]), a_max=float(window[1]), b_min=0.0, b_max=1.0, clip=True)
    else:
        f = ScaleIntensityRangePercentiles(lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True)
    return np.asarray(f(vol.astype(np.float32)), dtype=np.float32)


def _slices(vol: np.ndarray, size: Sequence[int] | None, axis: int, step: int) -> list[np.ndarray]:
    from monai.transforms import Resize

    if vol.ndim == 2:
        planes = [vol]
    elif vol.ndim == 3:
        planes = [np.take(vol, i, axis=axis) for i in range(0, vol.shape[axis], max(1, int(step)))]
    else:
        raise ValueError(f"expected a 2-D image or a 3-D volume, got shape {vol.shape}")
    if size is None:
        return [p.astype(np.float32) for p in planes]
    resize = Resize(spatial_size=tuple(int(s) for s in size), mode="area")
    return [np.asarray(resize(p[None].astype(np.float32)))[0] for p in planes]


def read_dicom(path: str | Path, size: Sequence[int] | None = None, window: Sequence[float] = HU_WINDOW,
               axis: int = 0, step: int = 1) -> tuple[list[np.ndarray], dict[str, Any]]:
    """The de-identified slices of a DICOM file (float H×W in [0, 1]) and its kept metadata.

    Raises:
        ValueError: not a DICOM file, no pixel data, or pixel data this installation cannot decode
            (naming the file and the transfer syntax).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError) as err:
        raise ValueError(f"{path}: not a readable DICOM file ({err})") from err
    removed = deidentify(ds)
    if "PixelData" not in ds:
        raise ValueError(f"{path}: no pixel data (modality {ds.get('Modality', '?')}, SOP class "
                         f"{ds.get('SOPClassUID', '?')})")
    try:
        arr = ds.pixel_array
    except Exception as err:  # a compressed transfer syntax without its decoder plugin
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "?")
        raise ValueError(f"{path}: pixel data of transfer syntax {ts} cannot be decoded here ({err})") from err
    from pydicom.pixels import apply_modality_lut

    modality = str(ds.get("Modality", ""))
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and ds.get("SamplesPerPixel", 1) > 1:
        arr = arr[..., :3].mean(axis=-1)  # colour (ultrasound): luminance
    vol = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    ct = modality == "CT"
    slices = _slices(_scale(vol, ct, window), size, axis, step)
    meta = {"path": str(path), "modality": modality, "sex": str(ds.get("PatientSex", "") or ""),
            "age": str(ds.get("PatientAge", "") or ""), "n_slices": len(slices), "windowed_hu": list(window) if ct else None,
            "removed": removed}
    return slices, meta


def read_nifti(path: str | Path, size: Sequence[int] | None = None, ct: bool = True,
               window: Sequence[float] = HU_WINDOW, axis: int = 2, step: int = 1) -> tuple[list[np.ndarray], dict[str, Any]]:
    """The slices of a NIfTI volume (through MONAI) along ``axis``, windowed as CT (HU) or percentile-scaled.

    Raises:
        ValueError: not a readable NIfTI file (naming it).
    """
    from monai.transforms import LoadImage

    path = Path(path)
    try:
        vol = np.asarray(LoadImage(reader="NibabelReader", image_only=True)(str(path)), dtype=np.float32)
    except Exception as err:
        raise ValueError(f"{path}: not a readable NIfTI volume ({type(err).__name__}: {err})") from err
    if not np.isfinite(vol).all():
        raise ValueError(f"{path}: NaN or Inf voxels ({int((~np.isfinite(vol)).sum())})")
    slices = _slices(_scale(vol, ct, window), size, axis, step)
    return slices, {"path": str(path), "n_slices": len(slices), "shape": list(vol.shape),
                    "windowed_hu": list(window) if ct else None}
