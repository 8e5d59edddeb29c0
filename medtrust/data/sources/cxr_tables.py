"""Chest X-ray label tables in the layouts of NIH ChestX-ray14 and CheXpert (binary target)."""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from medtrust.data.records import DataError, Record
from medtrust.data.tables import read_table
from medtrust.data.sources.isic import IMAGE_EXTENSIONS

UNCERTAIN_POLICIES = ("zeros", "ones", "ignore")


def age_group(age: str, bins: Sequence[int]) -> str:
    """``"67"`` -> ``">=65"`` style group label from ascending bin edges (``unknown`` if not a number)."""
    try:
        a = float(str(age).rstrip("Y"))
    except ValueError:
        return "unknown"
    edges = list(bins)
    for lo, hi in zip([None, *edges], [*edges, None]):
        if (lo is None or a >= lo) and (hi is None or a < hi):
            return f"<{hi}" if lo is None else (f">={lo}" if hi is None else f"{lo}-{hi - 1}")
    return "unknown"


def checked_age_group(cell: str, bins: Sequence[int], where: str, column: str) -> str:
    """:func:`age_group` of a table cell; a blank cell is ``unknown``, anything else must be an age in years
    (``67``, ``067Y``) from 0 to 150.

    Raises:
        DataError: naming the row and column, for a cell that is not an age.
    """
    text = str(cell).strip()
    if not text:
        return "unknown"
    group = age_group(text, bins)
    if group == "unknown" or not 0 <= float(text.rstrip("Y")) < 150:
        raise DataError(f"{where}: {column}={text!r} is not an age in years (expected e.g. 67 or 067Y, 0-150, or blank)")
    return group


def _read(table: Path, needed: Sequence[str], what: str) -> pd.DataFrame:
    df = read_table(table, needed, f"{what} table")
    if df.empty:
        raise DataError(f"{table}: the table has no rows")
    return df


class NihChestXray14Source:
    """NIH ChestX-ray14: ``Data_Entry_2017.csv`` (``Image Index``, ``Finding Labels``, ``Patient ID``,
    ``Patient Age``, ``Patient Gender``, ``View Position``) and images found anywhere below
    ``image_root`` (the download splits them over ``images_001/images`` ...).

    Args:
        table: path of ``Data_Entry_2017.csv``.
        image_root: folder searched (recursively) for the image files; default: the table's folder.
        finding: target finding (label 1 if it is among the ``|``-separated finding labels).
        test_list: optional official ``test_list.txt``; its images form the test split and the rest
            is split train/val by patient. Without it, splits are computed per patient.
        views: keep only these view positions (e.g. ``[PA, AP]``); empty = all.
        age_bins: edges of the ``age_group`` attribute.
    """

    def __init__(self, table: str, image_root: str | None = None, finding: str = "Pneumonia",
                 test_list: str | None = None, views: Sequence[str] = (), age_bins: Sequence[int] = (40, 65)) -> None:
        self.table = Path(str(table)).expanduser().resolve()
        self.image_root = Path(str(image_root)).expanduser().resolve() if image_root else self.table.parent
        self.finding, self.views, self.age_bins = finding, list(views), list(age_bins)
        self.test_list = Path(str(test_list)).expanduser() if test_list else None

    @property
    def data_root(self) -> Path:
        """The folder every file of this source must lie in (unless ``data.allow_outside_root=true``)."""
        return self.image_root

    def describe(self) -> str:
        return f"nih_chestxray14({self.table}, finding={self.finding})"

    def records(self) -> list[Record]:
        cols = ["Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender", "View Position"]
        df = _read(self.table, cols, "NIH ChestX-ray14")
        index = {p.name: p for p in self.image_root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS}
        test = set(self.test_list.read_text().split()) if self.test_list else None
        out: list[Record] = []
        for i, row in enumerate(df.to_dict("records")):
            where = f"{self.table} row {i + 2}"
            if self.views and row["View Position"] not in self.views:
                continue
            pid = row["Patient ID"].strip()
            if not pid:
                raise DataError(f"{where}: empty 'Patient ID'; patient-level splits need it")
            name = row["Image Index"].strip()
            findings = {f.strip() for f in row["Finding Labels"].split("|") if f.strip()}
            if not findings:
                raise DataError(f"{where}: empty 'Finding Labels' (expected e.g. 'No Finding' or 'Pneumonia|Effusion')")
            path = index.get(name)
            rec: Record = {
                "id": Path(name).stem, "path": str(path or self.image_root / name), "mask_path": None,
                "label": int(self.finding in findings), "patient_id": f"nih_{pid}",
                "split": None if test is None else ("test" if name in test else None), "where": where,
                "attrs": {"sex": row["Patient Gender"] or "unknown", "age_group": checked_age_group(row["Patient Age"], self.age_bins, where, "Patient Age"),
                          "view": row["View Position"] or "unknown"},
            }
            if path is None:
                rec["error"] = f"{where}: image {name} not found below {self.image_root}"
            out.append(rec)
        if test is not None:
            # the official list fixes test; the rest is train/val by patient (deterministic hash)
            from medtrust.data.splits import assign_patient_splits

            rest = [r["patient_id"] for r in out if r["split"] is None]
            assign = assign_patient_splits(rest, {"train": 0.85, "val": 0.15}, 0)
            for r in out:
                if r["split"] is None:
                    r["split"] = assign[r["patient_id"]]
        return out


class ChexpertSource:
    """CheXpert ``train.csv``/``valid.csv`` layout: ``Path, Sex, Age, Frontal/Lateral, AP/PA,
    <14 findings>`` with values 1, 0, -1 (uncertain) or empty (not mentioned = negative).

    Args:
        table: the CSV; ``Path`` entries are relative to ``image_root`` (default: the folder
            above the table, as in the official download ``CheXpert-v1.0-small/train/...``).
        finding: target column, e.g. ``Pneumonia`` or ``Pleural Effusion``.
        uncertain: policy for ``-1``: ``zeros`` (U-Zeros), ``ones`` (U-Ones), ``ignore`` (drop the
            row); ``null`` makes an uncertain label an error naming the row.
        frontal_only: keep frontal views only.
        split: split of every row of this table (``train``/``val``/``test``), or null to compute
            patient-level splits (patient id parsed from ``patientNNNNN`` in the path).
    """

    def __init__(self, table: str, finding: str = "Pneumonia", uncertain: str | None = None,
                 image_root: str | None = None, frontal_only: bool = True, split: str | None = None,
                 age_bins: Sequence[int] = (40, 65)) -> None:
        if uncertain is not None and uncertain not in UNCERTAIN_POLICIES:
            raise ValueError(f"data.source.uncertain must be one of {UNCERTAIN_POLICIES} or null, got {uncertain!r}")
        self.table = Path(str(table)).expanduser().resolve()
        self.image_root = Path(str(image_root)).expanduser().resolve() if image_root else self.table.parent.parent
        self.finding, self.uncertain, self.frontal_only = finding, uncertain, frontal_only
        self.split, self.age_bins = split, list(age_bins)

    @property
    def data_root(self) -> Path:
        """The folder every file of this source must lie in (unless ``data.allow_outside_root=true``)."""
        return self.image_root

    def describe(self) -> str:
        return f"chexpert({self.table}, finding={self.finding}, uncertain={self.uncertain})"

    def records(self) -> list[Record]:
        df = _read(self.table, ["Path", "Sex", "Age", "Frontal/Lateral", self.finding], "CheXpert")
        out: list[Record] = []
        for i, row in enumerate(df.to_dict("records")):
            where = f"{self.table} row {i + 2}"
            if self.frontal_only and row["Frontal/Lateral"] != "Frontal":
                continue
            raw = row[self.finding].strip()
            try:
                value = float(raw) if raw else 0.0
            except ValueError as err:
                raise DataError(f"{where}: {self.finding}={raw!r}; expected 1, 0, -1 or empty") from err
            if value not in (0.0, 1.0, -1.0):
                raise DataError(f"{where}: {self.finding}={raw!r}; expected 1, 0, -1 or empty")
            if value == -1.0:
                if self.uncertain is None:
                    raise DataError(f"{where}: uncertain label (-1) for {self.finding!r} and no policy; set "
                                    f"data.source.uncertain to one of {UNCERTAIN_POLICIES}")
                if self.uncertain == "ignore":
                    continue
                value = 1.0 if self.uncertain == "ones" else 0.0
            m = re.search(r"(patient\d+)", row["Path"])
            if not m and self.split is None:
                raise DataError(f"{where}: no patient id (patientNNNNN) in Path {row['Path']!r}")
            path = self.image_root / row["Path"]
            rec: Record = {
                "id": row["Path"].strip(), "path": str(path), "mask_path": None, "label": int(value),
                "patient_id": m.group(1) if m else row["Path"], "split": self.split, "where": where,
                "attrs": {"sex": row["Sex"] or "unknown", "age_group": checked_age_group(row["Age"], self.age_bins, where, "Age")},
            }
            if not path.exists():
                rec["error"] = f"{where}: image not found: {path}"
            out.append(rec)
        return out
