"""Record ids are unique paths; repeated ids and the same pixels in two splits are refused by name."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from medtrust.data.datamodule import ImageDataModule
from medtrust.data.duplicates import PixelIndex, pixel_digest
from medtrust.data.records import DataError, Record
from medtrust.data.sources.csv import CsvSource, record_id
from medtrust.data.sources.folder import FolderSource
from medtrust.data.sources.isic import IsicSource
from medtrust.data.sources.medmnist import MedMnistSource
from tests.conftest import write_png


class ListSource:
    """Any source: the datamodule checks ids for all of them."""

    def __init__(self, records):
        self.recs = records

    def describe(self) -> str:
        return "list()"

    def records(self):
        return [dict(r) for r in self.recs]


def rec(i: int, image: np.ndarray, split: str | None = None, rid: str | None = None, pid: str | None = None) -> Record:
    return {"id": rid or f"r{i}", "path": f"mem://{i}", "mask_path": None, "label": 0, "patient_id": pid or f"P{i}",
            "split": split, "attrs": {}, "image": image}


def dm_for(source, **kw) -> ImageDataModule:
    return ImageDataModule(source, **{"image_size": [16, 16], "require_mask": False, **kw})


def images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in range(n)]


def test_record_is_a_documented_typed_dict():
    assert Record.__required_keys__ == {"id", "path", "mask_path", "label", "patient_id", "split", "attrs"}
    assert {"where", "error", "image", "mask", "text", "modality"} <= Record.__optional_keys__
    assert "safe_filename" in Record.__doc__


@pytest.mark.parametrize("path,root,expected", [
    ("images/a/x.png", "/d", "images/a/x.png"), ("./images//a/../a/x.png", "/d", "images/a/x.png"),
    ("/d/images/x.png", "/d", "images/x.png"), ("/elsewhere/x.png", "/d", "/elsewhere/x.png"),
    ("../other/x.png", "/d/sub", "/d/other/x.png"),
])
def test_record_id_is_the_posix_path_relative_to_the_root(path, root, expected):
    assert record_id(path, root) == expected


def test_folder_ids_and_patients_are_relative_paths_in_class_folders(tmp_path, phantom_records):
    # the same file name under two classes: two images, two patients (was one id and one patient: the stem)
    write_png(tmp_path / "images" / "benign" / "x.png", phantom_records[0]["image"])
    write_png(tmp_path / "images" / "malignant" / "x.png", phantom_records[1]["image"])
    recs = FolderSource(str(tmp_path), mask_dir=None, classes_from_subfolders=True).records()
    assert [(r["id"], r["patient_id"], r["label"]) for r in recs] == [
        ("images/benign/x.png", "images/benign/x.png", 0), ("images/malignant/x.png", "images/malignant/x.png", 1)]


def test_csv_ids_keep_folders_and_extension(tmp_path, phantom_records):
    for sub in ("a", "b"):
        write_png(tmp_path / "images" / sub / "x.png", phantom_records[0 if sub == "a" else 1]["image"])
    pd.DataFrame({"path": ["images/a/x.png", "images/b/x.png"], "split": ["train", "test"]}).to_csv(
        tmp_path / "m.csv", index=False)
    recs = CsvSource(str(tmp_path / "m.csv"), mask_column=None, label_column=None).records()
    assert [(r["id"], r["patient_id"]) for r in recs] == [("images/a/x.png",) * 2, ("images/b/x.png",) * 2]


def test_official_ids_stay_and_are_unique(isic_root, tmp_path):
    recs = IsicSource(str(isic_root)).records()
    assert all(r["id"].startswith("ISIC_") and "/" not in r["id"] for r in recs) and len({r["id"] for r in recs}) == 12
    np.savez(tmp_path / "m.npz", train_images=np.zeros((3, 8, 8), np.uint8), train_labels=np.zeros((3, 1), int),
             test_images=np.zeros((2, 8, 8), np.uint8), test_labels=np.zeros((2, 1), int))
    assert [r["id"] for r in MedMnistSource(str(tmp_path / "m.npz")).records()] == [
        "train_0", "train_1", "train_2", "test_0", "test_1"]


def test_repeated_ids_are_refused_naming_rows(tmp_path, csv_dataset):
    root = tmp_path / "data"
    shutil.copytree(csv_dataset.parent, root)
    df = pd.read_csv(root / "manifest.csv")
    df = pd.concat([df, df.iloc[[3]].assign(path="./" + df.loc[3, "path"])])  # the same file, spelled differently
    df.to_csv(root / "manifest.csv", index=False)
    with pytest.raises(DataError, match=rf"1 record id\(s\) occur more than once \(2 records\), e.g. "
                                        rf"'{df.iloc[3]['path']}' at .*manifest.csv row 5, .*manifest.csv row 14; expected each id once"):
        dm_for(CsvSource(str(root / "manifest.csv"))).split_records
    imgs = images(2)
    with pytest.raises(DataError, match="list\\(\\): 1 record id.*'same' at mem://0, mem://1"):
        dm_for(ListSource([rec(0, imgs[0], rid="same"), rec(1, imgs[1], rid="same")])).split_records


def leaky(policy: str = "error", **kw) -> ImageDataModule:
    imgs = images(6)
    recs = [rec(i, imgs[i], s) for i, s in enumerate(["train", "train", "val", "val", "test", "test"])]
    recs.append(rec(6, imgs[0].copy(), "test", pid="P-other"))  # train image 0 again, under another patient
    recs.append(rec(7, imgs[2].copy(), "val"))                   # a copy inside val: counted, not leakage
    return dm_for(ListSource(recs), duplicates=policy, **kw)


def test_same_pixels_in_two_splits_are_refused_naming_both_records():
    dm = leaky()
    dm.load_split("train")
    dm.load_split("val")  # a copy within one split is fine
    with pytest.raises(DataError, match=r"split 'test': 1 image\(s\) have the same pixels as images of split\(s\) "
                                        r"\['train', 'val'\].*test 'r6' \(mem://6, patient P-other\) = train 'r0' "
                                        r"\(mem://0, patient P0\); expected each image in one split only"):
        dm.load_split("test")
    dm = leaky()
    dm.load_split("test")  # order does not matter: splits load lazily, the check is incremental
    with pytest.raises(DataError, match=r"split 'train'.*train 'r0' \(mem://0, patient P0\) = test 'r6'"):
        dm.load_split("train")


def test_report_policy_warns_counts_and_writes_duplicates_csv(tmp_path, caplog):
    dm = leaky("report")
    for s in ("train", "val", "test"):
        dm.load_split(s)
    assert "same pixels" in caplog.text
    s = dm.summary()
    assert s["duplicates_across_splits"] == 1 and s["duplicates_within_splits"] == 1
    dm.write_splits(tmp_path)
    dup = pd.read_csv(tmp_path / "duplicates.csv")
    assert sorted(zip(dup["split"], dup["id"])) == [("test", "r6"), ("train", "r0")] and dup["image"].nunique() == 1


def test_no_duplicates_no_file_and_cal_counts_as_a_split(tmp_path):
    imgs = images(30, seed=1)
    split_cfg = {"calibration_fraction": 0.3}

    def source(val_image=None):
        recs = [rec(i, imgs[i], "train" if i < 20 else "val") for i in range(30)]
        if val_image is not None:
            recs[-1]["image"] = val_image
        return ListSource(recs)

    dm = dm_for(source(), duplicates="report", splits=split_cfg)
    dm.setup("fit")  # loads train, val and cal
    assert set(dm._cache) == {"train", "val", "cal"}
    dm.write_splits(tmp_path)
    assert dm.summary()["duplicates_across_splits"] == 0 and not (tmp_path / "duplicates.csv").exists()
    cal = dm.split_records["cal"][0]
    with pytest.raises(DataError, match=rf"'r29' \(mem://29, patient P29\) = cal '{cal['id']}'|"
                                        rf"cal '{cal['id']}' .* = val 'r29'"):
        dm_for(source(cal["image"]), splits=split_cfg).setup("fit")


def test_pixel_digest_depends_on_pixels_and_shape():
    a = np.zeros((1, 4, 6), np.uint8)
    assert pixel_digest(a) == pixel_digest(a.copy()) != pixel_digest(a.reshape(1, 6, 4))
    b = a.copy()
    b[0, 0, 0] = 1
    assert pixel_digest(a) != pixel_digest(b)
    idx = PixelIndex()
    idx.add("train", [pixel_digest(a)], [rec(0, a)])
    with pytest.raises(ValueError, match="already added"):
        idx.add("train", [pixel_digest(b)], [rec(1, b)])


def test_bad_duplicates_policy():
    with pytest.raises(ValueError, match=r"data.duplicates must be one of \('error', 'report'\), got 'ignore'"):
        dm_for(ListSource([]), duplicates="ignore")
