"""One reader for every CSV a user hands the project (data manifests, NIH / CheXpert tables, prompt, rating and
generated-image CSVs): all cells as text, a UTF-8 byte-order mark ignored, and each way a CSV goes wrong named
with its file and what was expected, instead of a pandas error or a silently wrong column."""
from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Sequence
from pathlib import Path

import pandas as pd

from medtrust.data.records import DataError

OTHER_DELIMITERS = {";": "semicolon", "\t": "tab", "|": "pipe"}


def _header(path: Path) -> list[str]:
    """The header row of ``path``, parsed with commas (BOM dropped).

    Raises:
        DataError: not UTF-8 text, an empty file or header, duplicate column names, or a header that is
            separated by another delimiter than a comma.
    """
    with open(path, "rb") as f:
        raw = f.readline(1 << 20)
    try:
        line = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err}); expected a comma-separated CSV saved as UTF-8") from None
    if not line.strip():
        raise DataError(f"{path}: the file is empty or its first line is blank; expected a header row of column names")
    cols = next(csv.reader(io.StringIO(line)))
    if len(cols) == 1:
        for sep, name in OTHER_DELIMITERS.items():
            if sep in cols[0]:
                raise DataError(f"{path}: the header {line.strip()[:120]!r} is {name}-separated; expected a "
                                "comma-separated CSV (save it again with commas as the delimiter)")
    seen: set[str] = set()
    dups = [c for c in cols if c in seen or seen.add(c)]
    if dups:
        raise DataError(f"{path}: column(s) {sorted(set(dups))} appear twice in the header; expected unique names")
    return cols


def read_table(path: str | Path, required: Sequence[str] = (), what: str = "CSV", hint: str = "") -> pd.DataFrame:
    """``path`` as a frame of strings (blank cells are ``""``), checked as :func:`iter_table` checks it."""
    chunks = list(iter_table(path, required, what, hint, chunk_rows=None))
    return chunks[0] if chunks else pd.DataFrame(columns=_header(Path(path)), dtype=str)


def iter_table(path: str | Path, required: Sequence[str] = (), what: str = "CSV", hint: str = "",
               chunk_rows: int | None = 50_000) -> Iterator[pd.DataFrame]:
    """``path`` in chunks of ``chunk_rows`` rows (None: one frame), every cell a string.

    Args:
        required: columns that must be in the header.
        what: what the file is, for messages (``manifest``, ``NIH ChestX-ray14 table`` ...).
        hint: appended to the missing-column message (which config key sets the column names).

    Raises:
        DataError: a missing file, a non-UTF-8 or empty file, another delimiter, duplicate or missing columns,
            a row with more fields than the header (naming its line) -- always naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    cols = _header(path)
    missing = [c for c in required if c not in cols]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {cols}" + (f" ({hint})" if hint else ""))
    _check_fields(path, len(cols))
    # index_col=False: a row with one field too many must never become the index (every cell of the file shifted
    # one column to the right); _check_fields has refused such rows already
    reader = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig", index_col=False,
                         chunksize=chunk_rows or 1 << 62)
    try:
        with reader:
            yield from reader
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err}); expected a CSV saved as UTF-8") from None


def _check_fields(path: Path, n_fields: int) -> None:
    """Every non-blank row of ``path`` has the header's ``n_fields`` fields (a short row would be read as blank
    cells, a long one would shift its cells), else a DataError naming the first bad line.

    One pass of the csv module: about a second per million rows."""
    with open(path, newline="", encoding="utf-8-sig", errors="strict") as f:
        reader = csv.reader(f)
        try:
            for row in reader:
                if row and len(row) != n_fields:
                    kind = "fewer" if len(row) < n_fields else "more"
                    raise DataError(f"{path}: line {reader.line_num}: {len(row)} fields, {kind} fields than the "
                                    f"header's {n_fields}; expected a value (or an empty cell between commas) for "
                                    "every column, and cells holding commas quoted")
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text ({err}); expected a CSV saved as UTF-8") from None
        except csv.Error as err:
            raise DataError(f"{path}: line {reader.line_num}: not a well-formed CSV row ({err})") from None
