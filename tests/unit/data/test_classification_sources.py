"""Classification data: phantom CXR ground truth, MedMNIST npz, and bad input (NaN, labels, patients)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medtrust.data.datamodule import ImageDataModule
from medtrust.data.phantoms.cxr import PhantomCxrSource, render_cxr
from medtrust.data.records import DataError
from medtrust.data.sources.csv import CsvSource
from medtrust.data.sources.medmnist import MedMnistSource


def test_phantom_cxr_findings_masks_and_injected_difficulty():
    img, masks = render_cxr(0, 1, 64, pneumonia=True, covid=False)
    assert img.dtype == np.uint8 and masks["pneumonia"].any() and not masks["covid"].any()
    faint, _ = render_cxr(0, 1, 64, pneumonia=True, covid=False, contrast=0.3)
    none, _ = render_cxr(0, 1, 64, pneumonia=False, covid=False)
    m = masks["pneumonia"] == 1
    # the opacity adds brightness, less so at low contrast
    assert (img[m].astype(float) - none[m]).mean() > (faint[m].astype(float) - none[m]).mean() > 0
    recs = PhantomCxrSource(n_images=300, size=32, seed=0, difficulty={"sex": {"F": 0.5}}).records()
    pos = [r for r in recs if r["label"] == 1]
    assert 0.25 < len(pos) / len(recs) < 0.55 and all(r["mask"].any() for r in pos)
    assert {"sex", "age_group", "race", "finding_covid"} <= set(recs[0]["attrs"])
    with pytest.raises(ValueError, match="difficulty.sex: values \\['X'\\]"):
        PhantomCxrSource(difficulty={"sex": {"X": 0.5}})


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_medmnist_reads_official_keys_and_refuses_bad_files(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 255, (6, 28, 28), dtype=np.uint8)
    labels = np.array([[0], [1], [0], [1], [0], [1]])
    p = write_npz(tmp_path / "a.npz", train_images=imgs, train_labels=labels, val_images=imgs[:2], val_labels=labels[:2])
    recs = MedMnistSource(str(p)).records()
    assert len(recs) == 8 and {r["split"] for r in recs} == {"train", "val"}
    val_only = write_npz(tmp_path / "b.npz", val_images=imgs, val_labels=labels)
    with pytest.raises(DataError, match="missing 'train_images'"):
        MedMnistSource(str(val_only), required=["train"]).records()
    # by default a file without training arrays is read (evaluate.py scores a test-only file); training on it
    # stops at the empty training split, naming the source
    assert {r["split"] for r in MedMnistSource(str(val_only)).records()} == {"val"}
    dm = ImageDataModule(MedMnistSource(str(val_only)), image_size=28, channels=1, require_mask=False)
    with pytest.raises(DataError, match=r"medmnist\(.*b.npz\): split 'train' is empty"):
        dm.load_split("train")
    assert len(dm.load_split("val")[0]) == 6
    bad = imgs.astype(np.float32)
    bad[3, 0, 0] = np.nan
    with pytest.raises(DataError, match=r"train_images\[3\] has NaN/Inf pixels"):
        MedMnistSource(str(write_npz(tmp_path / "c.npz", train_images=bad, train_labels=labels))).records()
    with pytest.raises(DataError, match="MedMNIST file not found"):
        MedMnistSource(str(tmp_path / "none.npz")).records()


def test_label_outside_classes_and_missing_label_are_named(tmp_path, csv_dataset):
    imgs = np.zeros((4, 28, 28), np.uint8)
    p = write_npz(tmp_path / "l.npz", train_images=imgs, train_labels=np.array([[0], [1], [5], [1]]),
                  val_images=imgs, val_labels=np.array([[0], [1], [0], [1]]))
    dm = ImageDataModule(MedMnistSource(str(p)), image_size=28, channels=1, require_mask=False, num_classes=2)
    with pytest.raises(DataError, match=r"train_images\[2\]: label 5 is outside \[0, 2\)"):
        dm.load_split("train")
    with pytest.raises(DataError, match=r"missing column\(s\) \['diagnosis'\]"):
        CsvSource(str(csv_dataset), label_column="diagnosis").records()


def test_patient_id_required_only_when_splits_are_computed(tmp_path, csv_dataset):
    df = pd.read_csv(csv_dataset)
    df.loc[2, "patient_id"] = ""
    df.drop(columns="split").to_csv(tmp_path / "nosplit.csv", index=False)
    for sub in ("images", "masks"):
        (tmp_path / sub).symlink_to(csv_dataset.parent / sub)
    with pytest.raises(DataError, match="row 4: no patient id"):
        CsvSource(str(tmp_path / "nosplit.csv")).records()
    df.to_csv(tmp_path / "withsplit.csv", index=False)
    assert len(CsvSource(str(tmp_path / "withsplit.csv")).records()) == 12


def test_a_non_integer_label_among_numbers_is_refused_not_remapped(tmp_path, csv_dataset):
    df = pd.read_csv(csv_dataset)
    for sub in ("images", "masks"):
        (tmp_path / sub).symlink_to(csv_dataset.parent / sub)
    df["label"] = [str(i % 2) for i in range(len(df))]
    df.to_csv(tmp_path / "ints.csv", index=False)
    got = {r["id"]: r["label"] for r in CsvSource(str(tmp_path / "ints.csv")).records()}
    assert sorted(set(got.values())) == [0, 1]
    df["label"] = ["1.0" if i % 2 else "0.0" for i in range(len(df))]     # pandas writes integers with NaN as floats
    df.to_csv(tmp_path / "floats.csv", index=False)
    assert {r["id"]: r["label"] for r in CsvSource(str(tmp_path / "floats.csv")).records()} == got
    df.loc[3, "label"] = "#"                 # sorts before "0": the old mapping made every "0" a 1, silently
    df.to_csv(tmp_path / "stray.csv", index=False)
    with pytest.raises(DataError, match=r"stray\.csv: row 5: label '#' is not an integer class index"):
        CsvSource(str(tmp_path / "stray.csv")).records()
    df.loc[3, "label"] = "0.5"
    df.to_csv(tmp_path / "half.csv", index=False)
    with pytest.raises(DataError, match=r"row 5: label '0.5' is not an integer"):
        CsvSource(str(tmp_path / "half.csv")).records()
