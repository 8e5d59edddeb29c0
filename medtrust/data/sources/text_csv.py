"""Image-text manifest (``path,text,modal``): the data of the text-conditioned generator.

Read in chunks of ``chunk_rows`` rows, so a manifest of millions of rows is never parsed into one
table; only the records (a small dict per row) are kept.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pandas as pd

from medtrust.data.records import DataError, Record, normalise_split
from medtrust.data.tables import iter_table
from medtrust.data.sources.csv import record_id

REQUIRED = ("path", "text", "modal")


class TextCsvSource:
    """Records from a CSV with columns ``path`` (image, relative to the CSV's folder), ``text``
    (report or prompt) and ``modal`` (modality name, one of ``modalities``).

    Optional columns: ``label`` (integer finding class, e.g. 0 absent / 1 left / 2 right),
    ``patient_id`` and ``split``; every other column is kept as an attribute (``attrs``), e.g. sex,
    age_group, view, diagnosis.

    Args:
        manifest: the CSV file.
        modalities: modality names; a row's ``modal`` must be one of them (its index is the record's
            ``modality``).
        label_column, patient_column, split_column: column names (absent columns are allowed).
        chunk_rows: rows parsed at a time.

    Row problems (empty ``path`` or ``text``, a ``modal`` not in ``modalities``, a missing image file,
    a label that is not an integer) become records with an ``error`` naming the row: the datamodule
    raises it, or skips and counts it under ``data.on_bad=skip``.

    Raises:
        DataError: missing manifest, unreadable CSV, a missing required column, or no rows.
    """

    def __init__(self, manifest: str, modalities: Sequence[str], label_column: str | None = "label",
                 patient_column: str | None = "patient_id", split_column: str | None = "split",
                 chunk_rows: int = 50_000) -> None:
        self.manifest = Path(str(manifest)).expanduser().resolve()
        self.modalities = [str(m) for m in modalities]
        if not self.modalities:
            raise DataError("data.modalities is empty; expected the modality names of the manifest's 'modal' column")
        self.cols = {"label": label_column, "patient": patient_column, "split": split_column}
        self.chunk_rows = max(1, int(chunk_rows))

    @property
    def data_root(self) -> Path:
        """The folder every file of this source must lie in (unless ``data.allow_outside_root=true``)."""
        return self.manifest.parent

    def describe(self) -> str:
        return f"text_csv({self.manifest})"

    def _chunks(self) -> Iterator[pd.DataFrame]:
        if not self.manifest.is_file():
            raise DataError(f"manifest not found: {self.manifest} (set data.manifest=<CSV with path,text,modal>)")
        yield from iter_table(self.manifest, REQUIRED, "manifest", chunk_rows=self.chunk_rows,
                              hint="expected path,text,modal (+ optional label, patient_id, split, attributes)")

    def records(self) -> list[Record]:
        base = self.manifest.parent
        index = {m: i for i, m in enumerate(self.modalities)}
        out: list[Record] = []
        line = 1  # the header
        for chunk in self._chunks():
            if line == 1:
                missing = [c for c in REQUIRED if c not in chunk.columns]
                if missing:
                    raise DataError(f"{self.manifest}: missing column(s) {missing}; found {list(chunk.columns)}; "
                                    f"expected {list(REQUIRED)} (+ optional label, patient_id, split, attributes)")
                known = {*REQUIRED, *(c for c in self.cols.values() if c)}
                attr_cols = [c for c in chunk.columns if c not in known]
                has = {k: bool(c) and c in chunk.columns for k, c in self.cols.items()}
            for row in chunk.to_dict("records"):
                line += 1
                out.append(self._record(row, f"{self.manifest} row {line}", base, index, attr_cols, has))
        if not out:
            raise DataError(f"{self.manifest}: the manifest has no rows")
        return out

    def _record(self, row: dict, where: str, base: Path, index: dict[str, int], attr_cols: list[str],
                has: dict[str, bool]) -> Record:
        rel, text, modal = row["path"].strip(), row["text"].strip(), row["modal"].strip()
        errors = []
        if not rel:
            errors.append("empty 'path' cell; expected an image path")
        if not text:
            errors.append("empty 'text' cell; expected the report or prompt of the image")
        if modal not in index:
            errors.append(f"unknown modality {modal!r} in column 'modal'; expected one of {self.modalities} "
                          "(data.modalities)")
        path = (base / rel).resolve() if rel and not Path(rel).is_absolute() else Path(rel)
        if rel and not errors and not path.is_file():
            errors.append(f"image file not found: {path}")
        label = None
        if has["label"] and row[self.cols["label"]].strip():
            cell = row[self.cols["label"]].strip()
            if cell.lstrip("-").isdigit():
                label = int(cell)
            else:
                errors.append(f"label {cell!r} in column {self.cols['label']!r} is not an integer class")
        split = None
        if has["split"] and row[self.cols["split"]].strip():
            try:
                split = normalise_split(row[self.cols["split"]], where)
            except DataError as err:
                errors.append(str(err).removeprefix(f"{where}: "))
        rid = record_id(rel or f"row{where.rsplit(' ', 1)[-1]}", base)
        pid = row[self.cols["patient"]].strip() if has["patient"] else ""
        rec: Record = {
            "id": rid, "path": str(path), "mask_path": None, "label": label, "patient_id": pid or rid,
            "split": split, "text": text, "modality": index.get(modal),
            "attrs": {"modal": modal, **{c: (row[c].strip() or "unknown") for c in attr_cols}}, "where": where,
        }
        if errors:
            rec["error"] = f"{where}: " + "; ".join(errors)
        return rec
