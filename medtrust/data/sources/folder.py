"""Plain image folder: ``images/`` (optionally one sub-folder per class) and ``masks/``."""
from __future__ import annotations

from pathlib import Path

from medtrust.data.records import DataError, Record
from medtrust.data.sources.isic import IMAGE_EXTENSIONS


class FolderSource:
    """Records from an image folder.

    Layout: ``root/<image_dir>/**/<stem>.<ext>`` and, for segmentation,
    ``root/<mask_dir>/<stem><mask_suffix>.<ext>``. When ``classes_from_subfolders`` is true, the
    first sub-folder under ``image_dir`` names the class (sorted order gives the label index).
    There are no patient ids, so each image is its own patient and splits are computed. A record's
    ``id`` and ``patient_id`` are its path relative to ``root`` in POSIX form
    (``images/benign/x.png``), so same-named files in different class folders stay two images of
    two patients.

    Args:
        root: data folder.
        image_dir: images sub-folder (``""`` = ``root`` itself).
        mask_dir: masks sub-folder, or ``None`` for no masks.
        mask_suffix: text between the image stem and the mask extension.
        classes_from_subfolders: derive labels from sub-folder names.
        require_masks: a missing mask folder is an error (segmentation); otherwise images simply
            have no masks (e.g. unlabelled images scored by a classifier).
    """

    def __init__(
        self,
        root: str,
        image_dir: str = "images",
        mask_dir: str | None = "masks",
        mask_suffix: str = "",
        classes_from_subfolders: bool = False,
        require_masks: bool = True,
    ) -> None:
        self.root = Path(str(root)).expanduser()
        self.image_dir, self.mask_dir, self.mask_suffix = image_dir, mask_dir, mask_suffix
        self.classes_from_subfolders = classes_from_subfolders
        self.require_masks = require_masks

    @property
    def data_root(self) -> Path:
        """The folder every file of this source must lie in (unless ``data.allow_outside_root=true``)."""
        return self.root

    def describe(self) -> str:
        return f"folder({self.root})"

    def _find_mask(self, stem: str) -> Path | None:
        folder = self.root / str(self.mask_dir)
        for ext in IMAGE_EXTENSIONS:
            cand = folder / f"{stem}{self.mask_suffix}{ext}"
            if cand.exists():
                return cand
        return None

    def records(self) -> list[Record]:
        img_root = self.root / self.image_dir
        if not img_root.is_dir():
            raise DataError(f"image folder not found: {img_root} (set data.root=<folder>)")
        if self.mask_dir is not None and not (self.root / self.mask_dir).is_dir():
            if not self.require_masks:
                self.mask_dir = None
            else:
                raise DataError(f"mask folder not found: {self.root / self.mask_dir} (set data.source.mask_dir, or null for none)")
        images = sorted(p for p in img_root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not images:
            raise DataError(f"{img_root}: no images with extensions {IMAGE_EXTENSIONS}")
        classes = sorted({p.relative_to(img_root).parts[0] for p in images if len(p.relative_to(img_root).parts) > 1})
        out: list[Record] = []
        for p in images:
            rid = p.relative_to(self.root).as_posix()
            label = None
            if self.classes_from_subfolders:
                parts = p.relative_to(img_root).parts
                if len(parts) < 2:
                    raise DataError(f"{p}: not inside a class sub-folder of {img_root} (classes_from_subfolders=true)")
                label = classes.index(parts[0])
            mask, error = None, None
            if self.mask_dir is not None:
                mask = self._find_mask(p.stem)
                if mask is None:
                    error = f"image without mask: {p} (expected {self.root / self.mask_dir}/{p.stem}{self.mask_suffix}.<ext>)"
            out.append({"id": rid, "path": str(p), "mask_path": str(mask) if mask else None, "label": label,
                        "patient_id": rid, "split": None, "attrs": {}, **({"error": error} if error else {})})
        return out
