"""MedMNIST ``.npz`` files (official key layout ``<split>_images`` / ``<split>_labels``)."""
from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medtrust.data.records import DataError, Record

NPZ_SPLITS = {"train": "train", "val": "val", "test": "test"}


class MedMnistSource:
    """Records from a MedMNIST ``.npz`` (e.g. ``pneumoniamnist_28.npz``), official splits kept.

    MedMNIST has no patient ids; each image is its own record id ``<split>_<index>``.

    Args:
        path: the ``.npz`` file.
        splits: which splits to read; a split whose arrays are absent is skipped unless it is
            listed in ``required``.
        required: splits that must be present. None by default: a test-only file is evaluated
            (``evaluate.py data.path=<test.npz>``), and training on a file without ``train_*`` arrays stops
            at the empty training split, naming this source.

    Raises:
        DataError: missing file, missing keys (lists the keys found), image/label count mismatch,
            non-finite pixels (names key and index) or labels that are not integers.
    """

    def __init__(self, path: str, splits: Sequence[str] = ("train", "val", "test"),
                 required: Sequence[str] = ()) -> None:
        self.path = Path(str(path)).expanduser().resolve()
        self.splits, self.required = list(splits), list(required)

    def describe(self) -> str:
        return f"medmnist({self.path})"

    def records(self) -> list[Record]:
        if not self.path.is_file():
            raise DataError(f"MedMNIST file not found: {self.path} (set data.path=<file.npz>)")
        try:
            data = np.load(self.path)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise DataError(f"{self.path}: not a readable .npz ({err})") from err
        keys = list(data.keys())
        out: list[Record] = []
        for split in self.splits:
            ik, lk = f"{split}_images", f"{split}_labels"
            if ik not in keys or lk not in keys:
                if split in self.required:
                    raise DataError(f"{self.path}: missing {ik!r}/{lk!r}; keys are {keys}")
                continue
            try:
                images, labels = data[ik], data[lk]
            except ValueError as err:  # object arrays need pickle, which is never allowed
                raise DataError(f"{self.path}: {ik!r}/{lk!r} cannot be read without pickle ({err}); expected "
                                "numeric arrays (uint8 images, integer labels)") from err
            if images.dtype.kind not in "uifb":
                raise DataError(f"{self.path}: {ik} has dtype {images.dtype}; expected numeric pixels")
            if len(images) != len(labels):
                raise DataError(f"{self.path}: {ik} has {len(images)} images but {lk} has {len(labels)} labels")
            if len(images) == 0:  # an empty split: no records (a split the run needs stops as empty, named)
                continue
            if images.dtype.kind == "f":
                bad = np.where(~np.isfinite(images.reshape(len(images), -1)).all(1))[0]
                if len(bad):
                    raise DataError(f"{self.path}: {ik}[{int(bad[0])}] has NaN/Inf pixels ({len(bad)} images); "
                                    "expected finite values")
                lo, hi = float(images.min()), float(images.max())
                images = (images - lo) / (hi - lo or 1) * 255 if hi > 1 else images * 255
                images = np.clip(images, 0, 255).astype(np.uint8)
            elif images.dtype != np.uint8:
                # wider or signed integers (e.g. uint16): rescaled from the array's range like float pixels,
                # never wrapped modulo 256; uint8-range values are kept as they are
                lo, hi = int(images.min()), int(images.max())
                images = (images.astype(np.uint8) if lo >= 0 and hi <= 255 else
                          np.rint((images.astype(np.float64) - lo) / (hi - lo or 1) * 255).astype(np.uint8))
            labels = np.asarray(labels).reshape(len(labels), -1)
            if labels.shape[1] != 1 or labels.dtype.kind not in "iub":
                raise DataError(f"{self.path}: {lk} must hold one integer label per image, got shape "
                                f"{labels.shape} dtype {labels.dtype}")
            for i in range(len(images)):
                out.append({"id": f"{split}_{i}", "path": f"{self.path}#{ik}[{i}]", "mask_path": None,
                            "image": images[i], "label": int(labels[i, 0]), "patient_id": f"{split}_{i}",
                            "split": split, "attrs": {}})
        if not out:
            raise DataError(f"{self.path}: no split of {self.splits} found; keys are {keys}")
        return out
