"""ISIC 2018 Task 1 folder layout with its official training/validation/test splits."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from medtrust.data.records import DataError, Record

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


class IsicSource:
    """Records from the official ISIC 2018 Task 1 download.

    Expected under ``root`` (names configurable)::

        ISIC2018_Task1-2_Training_Input/ISIC_0000000.jpg
        ISIC2018_Task1_Training_GroundTruth/ISIC_0000000_segmentation.png
        ISIC2018_Task1-2_Validation_Input/   ISIC2018_Task1_Validation_GroundTruth/
        ISIC2018_Task1-2_Test_Input/         ISIC2018_Task1_Test_GroundTruth/

    The official split of each folder is kept. ISIC 2018 Task 1 gives no patient ids, so each image
    is its own patient (the ISIC challenge built its splits without patient overlap). Record ids are
    the official image ids (``ISIC_0000000``, the file stem), unique over the three splits; the
    datamodule refuses a repeated one (e.g. ``ISIC_0000000.jpg`` and ``.png`` side by side).

    Args:
        root: folder holding the ISIC folders.
        folders: split -> (input folder, ground-truth folder).
        mask_suffix: suffix of ground-truth files before ``.png``.
        splits: which official splits to read; a missing folder for one of them is an error.
    """

    def __init__(
        self,
        root: str,
        folders: dict[str, Sequence[str]] | None = None,
        mask_suffix: str = "_segmentation",
        splits: Sequence[str] = ("train", "val", "test"),
    ) -> None:
        self.root = Path(str(root)).expanduser()
        self.folders = {k: tuple(v) for k, v in (folders or {
            "train": ("ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"),
            "val": ("ISIC2018_Task1-2_Validation_Input", "ISIC2018_Task1_Validation_GroundTruth"),
            "test": ("ISIC2018_Task1-2_Test_Input", "ISIC2018_Task1_Test_GroundTruth"),
        }).items()}
        self.mask_suffix = mask_suffix
        self.splits = list(splits)

    @property
    def data_root(self) -> Path:
        """The folder every file of this source must lie in (unless ``data.allow_outside_root=true``)."""
        return self.root

    def describe(self) -> str:
        return f"isic2018({self.root})"

    def records(self) -> list[Record]:
        if not self.root.is_dir():
            raise DataError(f"ISIC root folder not found: {self.root} (set data.root=<folder with the ISIC 2018 Task 1 folders>)")
        out: list[Record] = []
        for split in self.splits:
            if split not in self.folders:
                raise DataError(f"data.source.splits: {split!r} has no entry in data.source.folders {list(self.folders)}")
            inp, gt = (self.root / f for f in self.folders[split])
            for folder in (inp, gt):
                if not folder.is_dir():
                    raise DataError(f"ISIC folder not found: {folder} (expected the official layout for split {split!r})")
            images = sorted(p for p in inp.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not images:
                raise DataError(f"{inp}: no images ({', '.join(IMAGE_EXTENSIONS)}) for split {split!r}")
            for p in images:
                mask = gt / f"{p.stem}{self.mask_suffix}.png"
                rec: Record = {"id": p.stem, "path": str(p), "mask_path": str(mask), "label": None,
                               "patient_id": p.stem, "split": split, "attrs": {}}
                if not mask.exists():
                    rec["error"] = f"image without mask: {p} (expected {mask})"
                out.append(rec)
        return out
