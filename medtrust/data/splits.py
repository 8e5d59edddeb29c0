"""Patient-level, deterministic train/val/test splits.

A patient's split depends only on ``(seed, patient_id)`` and the fractions: each patient id is
hashed to a number in [0, 1) and cut at the cumulative fractions. So a patient never moves split
when other patients are added to or removed from the data set (a test patient stays a test patient
as the data grows), and the same seed gives the same split on every machine. Official splits from
the source are kept when present. Splits are written as CSV with a content hash.
"""
from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from medtrust.data.records import ALL_SPLITS, SPLITS, DataError, Record
from medtrust.utils.io import atomic_write_bytes, write_json


def patient_unit_interval(seed: int, patient_id: str) -> float:
    """Map ``(seed, patient_id)`` to a reproducible number in [0, 1)."""
    digest = hashlib.sha256(f"{seed}:{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def check_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    """Validate split fractions (keys ⊆ train/val/test, non-negative, sum 1 within 1e-6).

    Raises:
        ValueError: naming ``data.splits.fractions`` and the bad values.
    """
    fr = {k: float(v) for k, v in fractions.items()}
    bad = set(fr) - set(SPLITS)
    if bad:
        raise ValueError(f"data.splits.fractions: unknown split(s) {sorted(bad)}; allowed {list(SPLITS)}")
    if any(v < 0 for v in fr.values()) or abs(sum(fr.values()) - 1) > 1e-6:
        raise ValueError(f"data.splits.fractions must be non-negative and sum to 1, got {fr}")
    return fr


def assign_patient_splits(
    patient_ids: Sequence[str], fractions: Mapping[str, float], seed: int
) -> dict[str, str]:
    """Assign each distinct patient id to a split.

    Args:
        patient_ids: patient ids (repeats allowed).
        fractions: e.g. ``{"train": 0.7, "val": 0.15, "test": 0.15}``.
        seed: split seed.

    Returns:
        patient id -> split name.
    """
    fr = check_fractions(fractions)
    order = [s for s in SPLITS if s in fr]
    cuts, acc = [], 0.0
    for s in order:
        acc += fr[s]
        cuts.append((acc, s))
    out: dict[str, str] = {}
    for pid in dict.fromkeys(patient_ids):
        u = patient_unit_interval(seed, pid)
        out[pid] = next((s for c, s in cuts if u < c), order[-1])
    return out


def check_patient_overlap(split_records: Mapping[str, Sequence[Record]]) -> None:
    """Raise if any patient appears in more than one split.

    Raises:
        DataError: listing (up to 10) patients and their splits.
    """
    seen: dict[str, set[str]] = defaultdict(set)
    for split, recs in split_records.items():
        for r in recs:
            seen[r["patient_id"]].add(split)
    clash = {p: sorted(s) for p, s in seen.items() if len(s) > 1}
    if clash:
        sample = dict(list(clash.items())[:10])
        raise DataError(
            f"{len(clash)} patient(s) appear in more than one split (patient leakage), e.g. {sample}; "
            "fix the split column or set data.splits.use_source=false to compute patient-level splits"
        )


def carve_calibration(train: Sequence[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Move a ``fraction`` of the training *patients* into a calibration split.

    The choice hashes ``(seed, "cal", patient_id)``, so it is deterministic, patient-level, stable
    as data grows, and independent of the train/val/test assignment. Returns ``(train, cal)``.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"data.splits.calibration_fraction must be in [0, 1), got {fraction}")
    train_out, cal = [], []
    for r in train:
        (cal if patient_unit_interval(seed, f"cal:{r['patient_id']}") < fraction else train_out).append(r)
    return train_out, cal


def make_splits(
    records: Sequence[Record], fractions: Mapping[str, float], seed: int, use_source: bool = True,
    calibration_fraction: float = 0.0,
) -> tuple[dict[str, list[Record]], str]:
    """Split records into train/val/test (and ``cal`` when ``calibration_fraction`` > 0).

    Official splits (every record has ``split``) are kept when ``use_source``; otherwise splits
    are computed per patient. Records with only some ``split`` values set are an error. A
    calibration split (for temperature scaling on data the model neither trained on nor was
    selected on) is carved from the training patients in either case.

    Returns:
        ``(split -> records, how)`` where ``how`` is ``"source"`` or ``"patient_hash"``.

    Raises:
        DataError: mixed split values, or a patient in two splits.
    """
    has = [r.get("split") is not None for r in records]
    if use_source and any(has):
        if not all(has):
            raise DataError(f"{sum(not h for h in has)} of {len(has)} records have no split value; "
                            "give every row a split or set data.splits.use_source=false")
        out = {s: [r for r in records if r["split"] == s] for s in SPLITS}
        how = "source"
    else:
        assign = assign_patient_splits([r["patient_id"] for r in records], fractions, seed)
        out = {s: [] for s in SPLITS}
        for r in records:
            out[assign[r["patient_id"]]].append(r)
        how = "patient_hash"
    if calibration_fraction > 0:
        out["train"], out["cal"] = carve_calibration(out["train"], float(calibration_fraction), seed)
        if not out["cal"] or not out["train"]:
            raise DataError(f"data.splits.calibration_fraction={calibration_fraction} left "
                            f"{len(out['train'])} train and {len(out['cal'])} calibration images; "
                            "both need at least one (more patients or another fraction)")
    check_patient_overlap(out)
    return out, how


def splits_frame(split_records: Mapping[str, Sequence[Record]]) -> pd.DataFrame:
    """One row per record: split, id, patient_id, path, mask_path, label."""
    rows = [
        {"split": s, "id": r["id"], "patient_id": r["patient_id"], "path": r.get("path"),
         "mask_path": r.get("mask_path"), "label": r.get("label")}
        for s in ALL_SPLITS for r in split_records.get(s, [])
    ]
    return pd.DataFrame(rows, columns=["split", "id", "patient_id", "path", "mask_path", "label"])


def write_splits(split_records: Mapping[str, Sequence[Record]], out_dir: str | Path, info: Mapping) -> str:
    """Write ``splits.csv`` and ``splits.json`` (counts, method, sha256 of the CSV) to ``out_dir``.

    Returns:
        The sha256 hex digest of the CSV content.
    """
    out_dir = Path(out_dir)
    data = splits_frame(split_records).to_csv(index=False).encode()
    digest = hashlib.sha256(data).hexdigest()
    atomic_write_bytes(out_dir / "splits.csv", data)
    counts = {s: {"images": len(rs), "patients": len({r["patient_id"] for r in rs})} for s, rs in split_records.items()}
    write_json(out_dir / "splits.json", {**dict(info), "counts": counts, "sha256": digest})
    return digest
