"""Duplicate records: repeated ids, and the same pixels in two splits (leakage).

Patient-level splits stop a *known* patient from crossing splits; they cannot see the same image
filed under two patient ids (a re-export, a copy in two class folders). :class:`PixelIndex` hashes
each image as loaded (uint8 at the working resolution) and finds identical pixels across every
split loaded so far, incrementally, since the datamodule loads splits lazily.
"""
from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from medtrust.data.records import DataError, Record

DUPLICATE_POLICIES = ("error", "report")
DUPLICATE_COLUMNS = ["image", "split", "id", "patient_id", "path"]


def record_where(rec: Record) -> str:
    """The manifest row, else the path, else the id: what a message names for a record."""
    return str(rec.get("where") or rec.get("path") or rec.get("id"))


def check_unique_ids(records: Sequence[Record], what: str, limit: int = 5) -> None:
    """Refuse records whose ``id`` repeats (file names and split files are keyed by id).

    Args:
        records: all records of a source.
        what: the source, for the message (``csv(/data/manifest.csv)``).
        limit: how many repeated ids the message shows.

    Raises:
        DataError: naming the repeated ids with their rows/paths and the expected fix.
    """
    by_id: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_id[str(r["id"])].append(r)
    dup = {k: v for k, v in by_id.items() if len(v) > 1}
    if not dup:
        return
    shown = "; ".join(f"{k!r} at {', '.join(record_where(r) for r in v[:3])}{', ...' if len(v) > 3 else ''}"
                      for k, v in list(dup.items())[:limit])
    raise DataError(
        f"{what}: {len(dup)} record id(s) occur more than once ({sum(map(len, dup.values()))} records), e.g. "
        f"{shown}; expected each id once, since explanations, failure cases and splits are stored per id "
        "(remove the repeated rows or files; a source's ids must be unique, e.g. paths relative to its root)"
    )


def pixel_digest(image: np.ndarray) -> str:
    """blake2b hex digest of an image's shape and bytes (same pixels and shape = same digest)."""
    arr = np.ascontiguousarray(image)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


class PixelIndex:
    """Digest -> split -> records, over the splits added so far."""

    def __init__(self) -> None:
        self._seen: dict[str, dict[str, list[Record]]] = {}

    @property
    def splits(self) -> set[str]:
        return {s for by_split in self._seen.values() for s in by_split}

    def across(self, split: str, digests: Sequence[str], records: Sequence[Record]) -> list[list[tuple[str, Record]]]:
        """Groups ``[(split, record), ...]`` of identical images that ``split`` shares with splits
        added before (records of ``split`` first); nothing is stored."""
        if split in self.splits:
            raise ValueError(f"split {split!r} was already added")
        mine: dict[str, list[Record]] = defaultdict(list)
        for d, r in zip(digests, records):
            mine[d].append(r)
        return [[(split, r) for r in recs] + [(s, o) for s, others in self._seen[d].items() for o in others]
                for d, recs in mine.items() if d in self._seen]

    def add(self, split: str, digests: Sequence[str], records: Sequence[Record]) -> None:
        if split in self.splits:
            raise ValueError(f"split {split!r} was already added")
        for d, r in zip(digests, records):
            self._seen.setdefault(d, {}).setdefault(split, []).append(r)

    def count_across(self) -> int:
        """Distinct images found in two or more splits."""
        return sum(len(by_split) > 1 for by_split in self._seen.values())

    def count_within(self) -> int:
        """Extra copies inside one split (not leakage: ``n - 1`` per image and split)."""
        return sum(len(recs) - 1 for by_split in self._seen.values() for recs in by_split.values())

    def rows(self) -> list[dict[str, str]]:
        """One row per record of an image found in two or more splits (``DUPLICATE_COLUMNS``)."""
        return [{"image": d[:16], "split": s, "id": str(r["id"]), "patient_id": str(r["patient_id"]),
                 "path": str(r.get("path"))}
                for d, by_split in self._seen.items() if len(by_split) > 1
                for s, recs in by_split.items() for r in recs]


def describe_groups(groups: Sequence[Sequence[tuple[str, Record]]], limit: int = 5) -> str:
    """``test 'b.png' (/d/b.png, patient P2) = train 'a.png' (/d/a.png, patient P1); ...``: the first
    record of each split per group, at most ``limit`` groups."""
    def one(split: str, r: Record) -> str:
        return f"{split} {r['id']!r} ({record_where(r)}, patient {r['patient_id']})"

    parts = []
    for g in groups[:limit]:
        first = {s: r for s, r in reversed(g)}  # reversed: the first record of each split wins
        names = [one(s, first[s]) for s in dict.fromkeys(s for s, _ in g)]
        extra = len(g) - len(names)
        parts.append(" = ".join(names) + (f" (+{extra} more copies)" if extra else ""))
    return "; ".join(parts) + ("; ..." if len(groups) > limit else "")
