"""CSV manifest source: one row per image, paths relative to the CSV's folder."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path, PurePath

import numpy as np
import pandas as pd

from medtrust.data.records import DataError, RealPaths, Record, normalise_split
from medtrust.data.tables import iter_table


def record_id(path: str | PurePath, root: str | PurePath) -> str:
    """Id of an image: ``path`` relative to ``root``, normalised, POSIX form, extension kept.

    Relative paths are taken as relative to ``root``; symlinks are not resolved (the id is what
    the data set calls the file). An absolute path outside ``root`` keeps its absolute form.
    """
    if not os.path.isabs(path):
        rel = os.path.normpath(path)
        if rel != os.pardir and not rel.startswith(os.pardir + os.sep):
            return PurePath(rel).as_posix()  # inside root: what relpath(join(root, path), root) gives, without it
    full = os.path.normpath(os.path.join(root, path))
    try:
        rel = os.path.relpath(full, os.path.normpath(root))
    except ValueError:  # Windows: another drive
        rel = os.pardir
    outside = rel == os.pardir or rel.startswith(os.pardir + os.sep)
    return PurePath(full if outside else rel).as_posix()


class CsvSource:
    """Records from a CSV manifest (e.g. ``../shared/data/ph2_skin_lesion_seg/manifest.csv``).

    Columns: ``path`` (required), ``mask_path``, ``label``, ``patient_id``, ``split`` and any
    attribute columns you list. Relative paths are resolved against the CSV's folder. Labels that
    are not integers are mapped to indices in sorted order (or the order of ``classes``).

    Args:
        manifest: path of the CSV file.
        path_column, mask_column, label_column, patient_column, split_column: column names;
            ``mask_column``/``label_column``/``patient_column``/``split_column`` may be ``None``
            or absent from the file.
        attr_columns: columns copied into ``attrs`` (missing values become ``"unknown"``).
        age_column: a column of ages in years, binned into the ``age_group`` attribute at ``age_bins``
            (e.g. ``[40, 65]`` -> ``<40``, ``40-64``, ``>=65``; a blank cell -> ``unknown``). None: no age group.
        age_bins: ascending bin edges of ``age_group``.
        classes: explicit class order for string labels.

    A record's ``id`` is its ``path`` cell relative to the CSV's folder, normalised, in POSIX form
    (``images/a/x.png``), so same-named files in different folders stay apart; a row without a
    patient id is its own patient under that id.

    A row whose image or mask file does not exist becomes a record with an ``error`` message
    (naming the row); the datamodule raises it, or skips it under ``data.on_bad=skip``.

    Raises:
        DataError: missing manifest, missing required column, empty path cell or bad split value.
    """

    def __init__(
        self,
        manifest: str,
        path_column: str = "path",
        mask_column: str | None = "mask_path",
        label_column: str | None = "label",
        patient_column: str | None = "patient_id",
        split_column: str | None = "split",
        attr_columns: Sequence[str] | None = None,
        classes: Sequence[str] | None = None,
        age_column: str | None = None,
        age_bins: Sequence[int] = (40, 65),
    ) -> None:
        self.manifest = Path(str(manifest)).expanduser().resolve()
        self.cols = dict(path=path_column, mask=mask_column, label=label_column,
                         patient=patient_column, split=split_column)
        self.attr_columns = list(attr_columns or [])
        self.classes = list(classes) if classes else None
        self.age_column, self.age_bins = age_column, [int(b) for b in age_bins]
        if self.age_bins != sorted(set(self.age_bins)):
            raise ValueError(f"data.source.age_bins={list(age_bins)}; expected ascending, distinct edges")

    @property
    def data_root(self) -> Path:
        """The folder every file of this source must lie in (unless ``data.allow_outside_root=true``)."""
        return self.manifest.parent

    def describe(self) -> str:
        return f"csv({self.manifest})"

    def _check_columns(self, df: pd.DataFrame) -> None:
        wanted = [self.cols["path"], *self.attr_columns, *([self.age_column] if self.age_column else [])]
        if self.cols["label"] is not None:
            wanted.append(self.cols["label"])  # configured label column must exist (null = unlabelled)
        missing = [c for c in wanted if c not in df.columns]
        if missing:
            raise DataError(
                f"{self.manifest}: missing column(s) {missing}; found {list(df.columns)} "
                f"(set data.source.path_column / label_column / attr_columns to match; "
                f"label_column=null for unlabelled images)"
            )

    def records(self) -> list[Record]:
        """One record per row. The manifest is read in chunks (bounded transient memory) and each file is
        stat-ed once through a per-folder realpath cache (:class:`~medtrust.data.records.RealPaths`)."""
        if not self.manifest.is_file():
            raise DataError(f"manifest not found: {self.manifest} (set data.manifest=<path to CSV>)")
        chunks = iter_table(self.manifest, what="manifest")
        first = next(chunks, None)
        if first is None:
            raise DataError(f"{self.manifest}: the manifest has no rows")
        self._check_columns(first)
        base = str(self.manifest.parent)
        has = {k: (c is not None and c in first.columns) for k, c in self.cols.items()}
        paths = RealPaths()
        self._attr_dicts: dict[tuple, dict[str, str]] = {}
        out: list[Record] = []
        raw: list[str] = []  # label cells: the map needs every label, applied after the pass
        i = 0
        for chunk in (first, *chunks):
            for row in chunk.itertuples(index=False, name=None):
                cells = dict(zip(chunk.columns, row))
                out.append(self._record(cells, i, base, has, paths))
                if has["label"]:
                    raw.append(cells[self.cols["label"]].strip())
                i += 1
        if not out:
            raise DataError(f"{self.manifest}: the manifest has no rows")
        if has["label"]:
            labels = self._label_map(raw)
            for rec, cell in zip(out, raw):
                rec["label"] = labels[cell] if cell else None
        return out

    def _record(self, row: dict, i: int, base: str, has: dict, paths: RealPaths) -> Record:
        where = f"{self.manifest} row {i + 2}"  # +1 header, +1 one-based line numbers
        rel = row[self.cols["path"]].strip()
        if not rel:
            raise DataError(f"{where}: empty '{self.cols['path']}' cell; expected an image path")
        path, exists = paths.real(os.path.join(base, rel))
        error = None if exists else f"{where}: image file not found: {path}"
        mask_path = None
        if has["mask"] and row[self.cols["mask"]].strip():
            mask_path, mask_exists = paths.real(os.path.join(base, row[self.cols["mask"]].strip()))
            if error is None and not mask_exists:
                error = f"{where}: mask file not found: {mask_path} (image {path})"
        split = normalise_split(row[self.cols["split"]], where) if has["split"] else None
        pid = row[self.cols["patient"]].strip() if has["patient"] else ""
        if not pid and not has["split"]:
            raise DataError(f"{where}: no patient id (column {self.cols['patient']!r}) and no split column; "
                            "patient-level splits need a patient id on every row")
        rid = record_id(rel, base)
        attrs = {**{c: (row[c].strip() or "unknown") for c in self.attr_columns},
                 **({"age_group": self._age_group(row[self.age_column], where)} if self.age_column else {})}
        return {
            "id": rid, "path": path, "mask_path": mask_path,
            "label": None, "patient_id": pid or rid, "split": split,
            "attrs": self._shared(attrs), "where": where, **({"error": error} if error else {}),
        }

    def _shared(self, attrs: dict[str, str]) -> dict[str, str]:
        """One dict per distinct attribute combination (records never modify their ``attrs``): a million rows of
        a few groups hold a few dicts, not a million."""
        key = tuple(attrs.items())
        return self._attr_dicts.setdefault(key, attrs)

    def _age_group(self, cell: str, where: str) -> str:
        from medtrust.data.sources.cxr_tables import age_group

        cell = str(cell).strip()
        if not cell:
            return "unknown"
        try:
            age = float(cell)
        except ValueError:
            raise DataError(f"{where}: {self.age_column}={cell!r} is not an age in years") from None
        if not 0 <= age < 150:
            raise DataError(f"{where}: {self.age_column}={cell!r} is not an age in years (expected 0-150)")
        return age_group(cell, self.age_bins)

    def _label_map(self, cells: Sequence[str]) -> dict[str, int]:
        """Label cell -> class index, from every row's (stripped) label cell in row order ("" = no label)."""
        values = sorted({v for v in cells if v})
        if self.classes:
            unknown = [v for v in values if v not in self.classes]
            if unknown:
                raise DataError(f"{self.manifest}: labels {unknown} are not in data.source.classes {self.classes}")
            return {c: i for i, c in enumerate(self.classes)}
        numeric = {v: _number(v) for v in values}
        if any(x is not None for x in numeric.values()):
            # numeric-looking labels are class indices: all must be integers, or the sorted-string mapping
            # would silently give "0" another index (e.g. "#" < "0")
            bad = [v for v, x in numeric.items() if x is None or x != int(x)]
            if bad:
                row = next(k for k, v in enumerate(cells) if v in bad) + 2  # + header, 1-based
                raise DataError(f"{self.manifest}: row {row}: label {bad[0]!r} is not an integer class index, "
                                f"while other labels are numbers ({len(bad)} such value(s): {bad[:5]}); expected "
                                "integer labels, or string classes declared with data.source.classes=[...]")
            return {v: int(x) for v, x in numeric.items()}
        return {v: i for i, v in enumerate(values)}


def _number(text: str) -> float | None:
    """``text`` as a finite number, else None."""
    try:
        x = float(text)
    except ValueError:
        return None
    return x if np.isfinite(x) else None
