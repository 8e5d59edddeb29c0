"""Images written by ``generate.py`` as a data source: the CSVs it writes next to its images
(``generated.csv`` or the shards' ``generated_shard<k>of<n>.csv``) say, for every image, the prompt,
its modality, its seed, how it was sampled and any columns of the prompt CSV (``sex``,
``age_group``, ``label`` ...). Used to rate generated images (the selector's ratings join them),
to fine-tune a generator on its own samples with their rewards (rating-driven fine-tuning), and to
score any classifier on synthetic images.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from medtrust.data.records import DataError, Record

# columns generate.py writes about how an image was made (not attributes of what it shows)
GENERATION_COLUMNS = ("file", "path", "row", "sample", "prompt", "modality", "seed", "sampler", "steps", "guidance",
                      "guidance_schedule", "min_guidance", "negative_prompt", "run_dir", "checkpoint", "shard",
                      "n_shards", "lora", "selector_run", "selector_score", "selector_p_top", "kept", "rejected_file", "n",
                      "record")


def read_generated(folder: str | Path) -> pd.DataFrame:
    """The union of every ``generated*.csv`` under ``folder`` (the shards of one sampling job), with
    ``path`` = the image file (absolute). Rows of images a selector did not keep (``kept`` 0, no
    file) are kept in the table with an empty ``path``.

    Raises:
        FileNotFoundError: no CSV; ValueError: a CSV without ``file``, or two shards wrote the same image.
    """
    folder = Path(folder)
    csvs = sorted(folder.rglob("generated*.csv"))
    if not csvs:
        raise FileNotFoundError(f"{folder}: no generated*.csv (expected the output of generate.py)")
    frames = []
    for c in csvs:
        d = pd.read_csv(c, keep_default_na=False, dtype={"file": str, "prompt": str, "modality": str})
        if "file" not in d.columns or "row" not in d.columns:
            raise ValueError(f"{c}: not a generate.py CSV (expected columns file, row, sample, prompt, modality)")
        d["path"] = [str((c.parent / f).resolve()) if str(f).strip() else "" for f in d["file"]]
        frames.append(d)
    df = pd.concat(frames, ignore_index=True)
    dup = df[df.duplicated(["row", "sample"], keep=False)]
    if len(dup):
        raise ValueError(f"{folder}: image(s) of the same prompt row and sample in two shards: {dup['path'].tolist()[:4]}")
    return df.sort_values(["row", "sample"]).reset_index(drop=True)


def attribute_columns(df: pd.DataFrame, wanted: str | Sequence[str] = "auto") -> list[str]:
    """The columns of a generate.py table that describe what an image shows or who it stands for
    (``auto``: every column of the prompt CSV that is not a generation setting)."""
    if wanted == "auto":  # a class column (label) is not an attribute
        return [c for c in df.columns if c not in (*GENERATION_COLUMNS, "label") and not c.startswith("selector_")]
    missing = [c for c in wanted if c not in df.columns]
    if missing:
        raise DataError(f"data.source.attr_columns: {missing} are not columns of the generated CSV; found {list(df.columns)}")
    return list(wanted)


class GeneratedSource:
    """Records from a ``generate.py`` output folder (its images and CSVs).

    Each image is a record with the prompt as ``text``, its modality, ``patient_id`` = its prompt row
    (the samples of one prompt are siblings: they stay in one split), every prompt-CSV column as an
    attribute, ``label`` from ``label_column`` when the prompt CSV had one, and ``reward`` from
    ``reward_column`` (rating-driven fine-tuning: e.g. the selector score written by
    ``generate.py selector_run=...``).

    Args:
        folder: the folder generate.py wrote (``out_dir``, or ``<run>/generated/<time>``).
        modalities: modality names; an image's ``modality`` must be one of them.
        reward_column: the column that is a record's ``reward`` (None: no reward).
        label_column: an integer class column of the prompt CSV (None or absent: unlabelled).
        attr_columns: ``auto`` or a list of columns copied into ``attrs``.
        kept_only: only images a selector kept (rows with a file).

    Raises:
        DataError: no generate.py CSV, a modality the run does not know, a reward that is missing or
            not a finite number, naming the CSV row.
    """

    def __init__(self, folder: str, modalities: Sequence[str], reward_column: str | None = None,
                 label_column: str | None = "label", attr_columns: str | Sequence[str] = "auto",
                 kept_only: bool = True) -> None:
        self.folder = Path(str(folder)).expanduser().resolve()
        self.modalities = [str(m) for m in modalities]
        self.reward_column, self.label_column = reward_column, label_column
        self.attr_columns, self.kept_only = attr_columns, bool(kept_only)

    @property
    def data_root(self) -> Path:
        """The folder every file of this source must lie in (unless ``data.allow_outside_root=true``)."""
        return self.folder

    def describe(self) -> str:
        return f"generated({self.folder})"

    def table(self) -> pd.DataFrame:
        if not self.folder.is_dir():
            raise DataError(f"generated images folder not found: {self.folder} (expected a generate.py out_dir)")
        try:
            return read_generated(self.folder)
        except (FileNotFoundError, ValueError) as err:
            raise DataError(str(err)) from err

    def records(self) -> list[Record]:
        df = self.table()
        if self.reward_column and self.reward_column not in df.columns:
            raise DataError(f"{self.folder}: no column {self.reward_column!r} (data.source.reward_column) in its "
                            f"generated CSV; found {list(df.columns)} (generate.py selector_run=<run> writes selector_score)")
        attrs = attribute_columns(df, self.attr_columns)
        index = {m: i for i, m in enumerate(self.modalities)}
        out: list[Record] = []
        for i, row in df.iterrows():
            where = f"{self.folder}/generated*.csv image row {int(row['row'])} sample {int(row['sample'])}"
            if not str(row["path"]).strip():
                if self.kept_only:
                    continue
                raise DataError(f"{where}: the selector did not keep this image (no file); use data.source.kept_only=true")
            m = str(row["modality"])
            if m not in index:
                raise DataError(f"{where}: modality {m!r} is not one of data.modalities {self.modalities}")
            rec: Record = {"id": str(row["file"]), "path": str(row["path"]), "mask_path": None, "label": None,
                           "patient_id": f"prompt{int(row['row'])}", "split": None, "text": str(row["prompt"]),
                           "modality": index[m], "where": where,
                           "attrs": {"modal": m, **{c: (str(row[c]).strip() or "unknown") for c in attrs
                                                    if c not in ("modal", self.label_column)}}}
            if self.label_column and self.label_column in df.columns and str(row[self.label_column]).strip():
                cell = str(row[self.label_column]).strip()
                if not cell.lstrip("-").isdigit():
                    raise DataError(f"{where}: {self.label_column}={cell!r} is not an integer class")
                rec["label"] = int(cell)
            if self.reward_column:
                try:
                    r = float(row[self.reward_column])
                except (TypeError, ValueError):
                    r = float("nan")
                if not math.isfinite(r):
                    raise DataError(f"{where}: {self.reward_column}={row[self.reward_column]!r}; expected a finite number")
                rec["reward"] = r
            if not Path(rec["path"]).is_file():
                rec["error"] = f"{where}: image file not found: {rec['path']}"
            out.append(rec)
        if not out:
            raise DataError(f"{self.folder}: no generated images (every row was dropped by the selector?)")
        return out
