"""Record sources (CSV, ISIC 2018 layout, folder) and bad input: each stops with one clear message."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from medtrust.data.datamodule import ImageDataModule
from medtrust.data.records import DataError
from medtrust.data.sources.csv import CsvSource
from medtrust.data.sources.folder import FolderSource
from medtrust.data.sources.isic import IsicSource
from tests.conftest import write_png


def dm_for(source, **kw) -> ImageDataModule:
    kw.setdefault("image_size", [32, 32])
    return ImageDataModule(source, **kw)


def copy_csv(csv_dataset, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(csv_dataset.parent, root)
    return root, root / "manifest.csv"


def test_csv_reads_relative_paths_splits_labels_and_attrs(csv_dataset):
    recs = CsvSource(str(csv_dataset), attr_columns=["sex"]).records()
    assert len(recs) == 12
    assert all(r["split"] in ("train", "val", "test") for r in recs)
    assert {r["label"] for r in recs} <= {0, 1}  # string labels mapped in sorted order
    assert all(r["attrs"]["sex"] in ("F", "M") for r in recs)
    dm = dm_for(CsvSource(str(csv_dataset)))
    batch = next(iter(dm.dataloader("train")))
    assert batch["image"].shape[1:] == (3, 32, 32) and batch["mask"].shape[1:] == (1, 32, 32)
    assert set(batch["mask"].unique().tolist()) <= {0.0, 1.0}
    assert {"label", "patient_id", "path", "index"} <= set(batch)


def test_csv_missing_manifest_and_missing_column(tmp_path, csv_dataset):
    with pytest.raises(DataError, match="manifest not found: .*nope.csv"):
        CsvSource(str(tmp_path / "nope.csv")).records()
    with pytest.raises(DataError, match=r"missing column\(s\) \['image'\]"):
        CsvSource(str(csv_dataset), path_column="image").records()


def test_csv_age_column_is_binned_into_age_group_and_a_bad_age_names_the_row(tmp_path, csv_dataset):
    """data.source.age_column (ieee8023's age in years): the audit's age_group attribute, blank -> unknown."""
    root, man = copy_csv(csv_dataset, tmp_path)
    df = pd.read_csv(man)
    df["age"] = [""] + [str(a) for a in np.linspace(5, 90, len(df) - 1).round()]
    df.to_csv(man, index=False)
    recs = CsvSource(str(man), attr_columns=["sex"], age_column="age", age_bins=[40, 65]).records()
    groups = [r["attrs"]["age_group"] for r in recs]
    assert groups[0] == "unknown" and recs[1]["attrs"] == {"sex": recs[1]["attrs"]["sex"], "age_group": "<40"}
    for r, age in zip(recs[1:], df["age"][1:]):
        assert r["attrs"]["age_group"] == ("<40" if float(age) < 40 else "40-64" if float(age) < 65 else ">=65")
    df.loc[4, "age"] = "sixty"
    df.to_csv(man, index=False)
    with pytest.raises(DataError, match=r"row 6: age='sixty' is not an age in years"):
        CsvSource(str(man), age_column="age").records()
    with pytest.raises(DataError, match=r"missing column\(s\) \['years'\]"):
        CsvSource(str(man), age_column="years").records()
    with pytest.raises(ValueError, match="ascending"):
        CsvSource(str(man), age_column="age", age_bins=[65, 40])


def test_csv_bad_split_value_names_the_row(tmp_path, csv_dataset):
    root, man = copy_csv(csv_dataset, tmp_path)
    df = pd.read_csv(man)
    df.loc[3, "split"] = "training-set"
    df.to_csv(man, index=False)
    with pytest.raises(DataError, match=r"row 5: unknown split 'training-set'"):
        CsvSource(str(man)).records()


def test_missing_mask_file_names_row_and_file_and_skip_reports_count(tmp_path, csv_dataset):
    root, man = copy_csv(csv_dataset, tmp_path)
    df = pd.read_csv(man)
    victim = df[df.split == "train"].index[0]
    (root / df.loc[victim, "mask_path"]).unlink()
    with pytest.raises(DataError, match=rf"row {victim + 2}: mask file not found: .*{df.loc[victim, 'mask_path']}"):
        dm_for(CsvSource(str(man))).load_split("train")
    dm = dm_for(CsvSource(str(man)), on_bad="skip")
    n = len(dm.load_split("train")[0])
    assert n == (df.split == "train").sum() - 1 and len(dm.skipped) == 1 and dm.summary()["skipped"] == 1


def test_mask_of_other_size_is_refused(tmp_path, csv_dataset):
    root, man = copy_csv(csv_dataset, tmp_path)
    df = pd.read_csv(man)
    write_png(root / df.loc[0, "mask_path"], np.zeros((20, 20), np.uint8))
    with pytest.raises(DataError, match="mask size 20x20 .* differs from its image .* size 32x32"):
        dm_for(CsvSource(str(man))).load_split(df.loc[0, "split"])


def test_corrupt_image_is_refused_and_named(tmp_path, csv_dataset):
    root, man = copy_csv(csv_dataset, tmp_path)
    df = pd.read_csv(man)
    (root / df.loc[1, "path"]).write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(DataError, match=f"row 3: image is unreadable or corrupt: .*{df.loc[1, 'path']}"):
        dm_for(CsvSource(str(man))).load_split(df.loc[1, "split"])


def test_empty_split_is_an_error(tmp_path, csv_dataset):
    root, man = copy_csv(csv_dataset, tmp_path)
    df = pd.read_csv(man)
    df = df[df.split != "test"]
    df.to_csv(man, index=False)
    dm = dm_for(CsvSource(str(man)))
    assert not dm.has_split("test")
    with pytest.raises(DataError, match="split 'test' is empty"):
        dm.load_split("test")


def test_isic_layout_keeps_official_splits(isic_root):
    dm = dm_for(IsicSource(str(isic_root)))
    assert {s: len(r) for s, r in dm.split_records.items()} == {"train": 6, "val": 3, "test": 3}
    assert dm.summary()["split_method"] == "source"
    batch = next(iter(dm.dataloader("val")))
    assert batch["mask"].sum() > 0


def test_isic_missing_root_and_missing_mask(tmp_path, isic_root):
    with pytest.raises(DataError, match="ISIC root folder not found"):
        IsicSource(str(tmp_path / "none")).records()
    root = tmp_path / "isic"
    shutil.copytree(isic_root, root)
    gt = sorted((root / "ISIC2018_Task1_Validation_GroundTruth").iterdir())[0]
    gt.unlink()
    with pytest.raises(DataError, match=f"image without mask: .*{gt.name.replace('_segmentation.png', '')}.jpg"):
        dm_for(IsicSource(str(root))).load_split("val")


def test_folder_source_computes_patient_splits(tmp_path, phantom_records):
    for r in phantom_records:
        write_png(tmp_path / "images" / f"{r['id']}.png", r["image"])
        write_png(tmp_path / "masks" / f"{r['id']}.png", r["mask"] * 255)
    dm = dm_for(FolderSource(str(tmp_path)), splits={"fractions": {"train": 0.6, "val": 0.2, "test": 0.2}})
    assert dm.summary()["split_method"] == "patient_hash"
    assert sum(len(r) for r in dm.split_records.values()) == 12
    (tmp_path / "masks" / f"{phantom_records[0]['id']}.png").unlink()
    with pytest.raises(DataError, match="image without mask"):
        recs = FolderSource(str(tmp_path)).records()
        dm2 = dm_for(FolderSource(str(tmp_path)), splits={"use_source": False, "fractions": {"train": 0.0, "val": 0.0, "test": 1.0}})
        assert len(recs) == 12
        dm2.load_split("test")
    with pytest.raises(DataError, match="image folder not found"):
        FolderSource(str(tmp_path / "missing")).records()
