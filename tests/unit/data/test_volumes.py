"""DICOM and NIfTI volumes: identifying tags stripped on import, CT windowed to HU [-1000, 1000], slices
at the configured size."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SHARED_DATA

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")

from medtrust.data.volumes import PHI_KEYWORDS, deidentify, identifying_elements, read_dicom, read_nifti  # noqa: E402

DICOM = SHARED_DATA / "dicom_samples_pydicom" / "dicom"
needs_shared = pytest.mark.skipif(not DICOM.is_dir(), reason="../shared/data/dicom_samples_pydicom is absent")


def _with_phi():
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "12345", "19700101"
    ds.InstitutionName, ds.ReferringPhysicianName, ds.AccessionNumber = "General Hospital", "House^Greg", "A1"
    ds.PatientSex, ds.PatientAge = "F", "052Y"
    seq_item = pydicom.Dataset()
    seq_item.PersonName = "Nested^Name"
    ds.add_new((0x0040, 0xA730), "SQ", [seq_item])  # a content sequence holding a person name
    ds.add_new((0x0011, 0x0010), "LO", "PRIVATE CREATOR")
    return ds


def test_deidentify_strips_every_identifying_element_and_keeps_sex_and_age():
    ds = _with_phi()
    assert identifying_elements(ds)
    removed = deidentify(ds)
    assert {"PatientName", "PatientID", "PatientBirthDate", "InstitutionName", "ReferringPhysicianName"} <= set(removed)
    assert identifying_elements(ds) == []
    assert not any(kw in ds for kw in PHI_KEYWORDS)
    assert not any(e.VR == "PN" or e.tag.is_private for e in ds.iterall())
    assert (ds.PatientSex, ds.PatientAge) == ("F", "052Y")


@needs_shared
@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "examples_overlay.dcm"])
def test_shared_dicom_files_import_de_identified_at_the_configured_size(name, tmp_path):
    slices, meta = read_dicom(DICOM / name, size=(32, 32))
    assert slices and all(s.shape == (32, 32) and 0 <= s.min() and s.max() <= 1 for s in slices)
    assert meta["modality"] in ("CT", "MR") and {"PatientName", "PatientID"} & set(meta["removed"])
    # what a downstream step could still read: re-read the file and de-identify it as the importer does
    ds = pydicom.dcmread(DICOM / name)
    deidentify(ds)
    assert identifying_elements(ds) == []
    if meta["modality"] == "CT":
        assert meta["windowed_hu"] == [-1000.0, 1000.0]


@needs_shared
def test_ct_is_windowed_in_hounsfield_units():
    ds = pydicom.dcmread(DICOM / "CT_small.dcm")
    from pydicom.pixels import apply_modality_lut

    hu = apply_modality_lut(ds.pixel_array, ds).astype(float)
    (img,), _ = read_dicom(DICOM / "CT_small.dcm")
    expected = np.clip((hu + 1000) / 2000, 0, 1)
    assert np.allclose(img, expected, atol=1e-5)


def test_nifti_volumes_become_windowed_slices(tmp_path):
    vol = np.full((16, 16, 5), -1000.0, np.float32)  # air
    vol[4:12, 4:12, :] = 0.0                          # water
    vol[6:10, 6:10, 2] = 2000.0                       # bone above the window
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(path))
    slices, meta = read_nifti(path, size=(16, 16))
    assert len(slices) == 5 and meta["shape"] == [16, 16, 5]
    s = slices[2]
    assert s[0, 0] == pytest.approx(0.0) and s[5, 5] == pytest.approx(0.5) and s[8, 8] == pytest.approx(1.0)
    assert read_nifti(path, size=(8, 8), step=2)[0][0].shape == (8, 8) and len(read_nifti(path, step=2)[0]) == 3
    (tmp_path / "bad.nii.gz").write_bytes(b"not a volume")
    with pytest.raises(ValueError, match="bad.nii.gz: not a readable NIfTI volume"):
        read_nifti(tmp_path / "bad.nii.gz")


def test_a_non_dicom_file_is_named(tmp_path):
    (tmp_path / "x.dcm").write_bytes(b"hello")
    with pytest.raises(ValueError, match="x.dcm: not a readable DICOM file"):
        read_dicom(tmp_path / "x.dcm")


def test_a_folder_of_volumes_is_a_data_source_of_slices_one_patient_per_file(tmp_path):
    from medtrust.data.datamodule import ImageDataModule
    from medtrust.data.records import DataError
    from medtrust.data.sources.volumes import VolumeSource

    for i in range(16):  # 16 patients: every split gets some whether the shared DICOM files are there or not
        vol = np.full((16, 16, 4), -1000.0, np.float32)
        vol[3 + i % 3:12, 4:12, :] = 40.0 * i
        nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / f"ct_{i}.nii.gz"))
    if DICOM.is_dir():  # the shared DICOM samples, de-identified on import
        (tmp_path / "dicom").mkdir()
        for name in ("CT_small.dcm", "MR_small.dcm"):
            (tmp_path / "dicom" / name).write_bytes((DICOM / name).read_bytes())
    recs = VolumeSource(str(tmp_path), [8, 8]).records()
    nii = [r for r in recs if r["path"].endswith(".nii.gz")]
    assert len(nii) == 64 and all(r["image"].shape == (8, 8) and r["image"].dtype == np.uint8 for r in recs)
    assert {r["patient_id"] for r in nii} == {f"ct_{i}.nii.gz" for i in range(16)}
    dcm = [r for r in recs if r["path"].endswith(".dcm")]
    if DICOM.is_dir():
        assert {r["attrs"]["modality"] for r in dcm} == {"CT", "MR"}
        assert not any("Patient" in str(v) for r in dcm for v in r["attrs"].values())
    dm = ImageDataModule(VolumeSource(str(tmp_path), [8, 8]), image_size=[8, 8], channels=1, require_mask=False,
                         splits={"use_source": False, "fractions": {"train": 0.5, "val": 0.25, "test": 0.25}})
    dm.setup()
    by = {s: {r["patient_id"] for r in dm.load_split(s)[2]} for s in ("train", "val", "test")}
    assert not (by["train"] & by["val"]) and not (by["train"] & by["test"])   # a volume's slices in one split
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no DICOM or NIfTI file"):
        VolumeSource(str(tmp_path / "empty"), [8, 8]).records()
    with pytest.raises(DataError, match="volume folder not found"):
        VolumeSource(str(tmp_path / "missing"), [8, 8]).records()
    (tmp_path / "ct_bad.nii.gz").write_bytes(b"not a volume")
    with pytest.raises(DataError, match="ct_bad.nii.gz: not a readable NIfTI volume"):
        VolumeSource(str(tmp_path), [8, 8]).records()
