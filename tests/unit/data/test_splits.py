"""Patient-level splits: deterministic, stable as data grows, leak-free, hashed."""
from __future__ import annotations

import json

import pytest

from medtrust.data.records import DataError
from medtrust.data.splits import assign_patient_splits, check_fractions, make_splits, write_splits

FR = {"train": 0.7, "val": 0.15, "test": 0.15}


def recs(n_patients: int, per: int = 2, split=None, start: int = 0):
    return [{"id": f"p{p}_{k}", "patient_id": f"p{p}", "split": split, "path": f"/x/p{p}_{k}.png"}
            for p in range(start, start + n_patients) for k in range(per)]


def test_same_seed_same_split_and_other_seed_differs():
    ids = [f"p{i}" for i in range(200)]
    assert assign_patient_splits(ids, FR, 1) == assign_patient_splits(ids, FR, 1)
    assert assign_patient_splits(ids, FR, 1) != assign_patient_splits(ids, FR, 2)


def test_fractions_are_respected_approximately():
    a = assign_patient_splits([f"p{i}" for i in range(4000)], FR, 0)
    counts = {s: sum(v == s for v in a.values()) / 4000 for s in FR}
    for s, f in FR.items():
        assert abs(counts[s] - f) < 0.03


def test_adding_patients_never_moves_existing_ones():
    small = assign_patient_splits([f"p{i}" for i in range(100)], FR, 5)
    big = assign_patient_splits([f"p{i}" for i in range(1000)], FR, 5)
    assert all(big[p] == s for p, s in small.items())


def test_images_of_one_patient_stay_together():
    out, how = make_splits(recs(60, per=3), FR, seed=0, use_source=False)
    assert how == "patient_hash"
    where = {}
    for s, rs in out.items():
        for r in rs:
            assert where.setdefault(r["patient_id"], s) == s


def test_official_split_kept_and_leak_is_an_error():
    rs = recs(4, per=1, split="train") + recs(2, per=1, split="val", start=4)
    out, how = make_splits(rs, FR, 0)
    assert how == "source" and len(out["train"]) == 4 and len(out["val"]) == 2 and out["test"] == []
    leaky = [{"id": "a", "patient_id": "p1", "split": "train"}, {"id": "b", "patient_id": "p1", "split": "test"}]
    with pytest.raises(DataError, match="patient leakage"):
        make_splits(leaky, FR, 0)


def test_partial_split_column_is_an_error():
    rs = recs(2, per=1, split="train") + recs(1, per=1, split=None, start=2)
    with pytest.raises(DataError, match="no split value"):
        make_splits(rs, FR, 0)


@pytest.mark.parametrize("fr", [{"train": 0.5, "val": 0.2}, {"train": 1.2, "val": -0.2}, {"training": 1.0}])
def test_bad_fractions(fr):
    with pytest.raises(ValueError, match="data.splits.fractions"):
        check_fractions(fr)


def test_written_split_has_hash_that_tracks_content(tmp_path):
    out, _ = make_splits(recs(30), FR, 0, use_source=False)
    h1 = write_splits(out, tmp_path / "a", {"method": "patient_hash"})
    h2 = write_splits(out, tmp_path / "b", {"method": "patient_hash"})
    out2, _ = make_splits(recs(30), FR, 1, use_source=False)
    h3 = write_splits(out2, tmp_path / "c", {"method": "patient_hash"})
    assert h1 == h2 != h3
    info = json.loads((tmp_path / "a" / "splits.json").read_text())
    assert info["sha256"] == h1 and sum(v["images"] for v in info["counts"].values()) == 60


def test_calibration_split_is_carved_from_train_patients_only():
    base, _ = make_splits(recs(300, per=2), FR, seed=3, use_source=False)
    out, _ = make_splits(recs(300, per=2), FR, seed=3, use_source=False, calibration_fraction=0.2)
    assert out["val"] == base["val"] and out["test"] == base["test"]  # val/test untouched
    train_p = {r["patient_id"] for r in base["train"]}
    cal_p = {r["patient_id"] for r in out["cal"]}
    assert cal_p < train_p and not cal_p & {r["patient_id"] for r in out["train"]}
    assert 0.12 < len(cal_p) / len(train_p) < 0.28
    # deterministic, and stable as patients are added
    again, _ = make_splits(recs(300, per=2), FR, seed=3, use_source=False, calibration_fraction=0.2)
    assert again["cal"] == out["cal"]
    more, _ = make_splits(recs(600, per=2), FR, seed=3, use_source=False, calibration_fraction=0.2)
    assert cal_p <= {r["patient_id"] for r in more["cal"]}


def test_calibration_split_from_an_official_split_and_bad_fraction():
    rs = recs(40, per=1, split="train") + recs(5, per=1, split="val", start=40)
    out, how = make_splits(rs, FR, 0, calibration_fraction=0.25)
    assert how == "source" and len(out["cal"]) + len(out["train"]) == 40 and out["cal"] and len(out["val"]) == 5
    with pytest.raises(ValueError, match="calibration_fraction"):
        make_splits(rs, FR, 0, calibration_fraction=1.0)
    with pytest.raises(DataError, match="calibration_fraction"):
        make_splits(recs(1, per=1, split="train"), FR, 0, calibration_fraction=0.01)
