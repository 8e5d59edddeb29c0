"""The bad-input matrix: every data source × every way its files and manifests go wrong, with the outcome each
case must end in. ``tests/reliability/test_bad_input_matrix.py`` runs it; ``python -m tests.reliability.matrix``
prints its size and how many cases end each way (the figures in README -> Reliability).

Every entry point (train.py, evaluate.py, explain.py, and the generator's and the audit's data) reads images
through one :class:`~medtrust.data.datamodule.ImageDataModule`, so a case is run where they all read: the
source's records, then ``load_split`` of every split, under ``data.on_bad=error`` and ``data.on_bad=skip``.
The entry-point cases (config keys, the same data through each script) are in ``test_entry_points.py``.

Outcomes:
    error: one DataError naming the file, row or key, under ``on_bad=error`` and under ``on_bad=skip``
        (a manifest or a source that is wrong as a whole cannot be skipped).
    skip:  one sample is bad: a DataError naming it under ``on_bad=error``; under ``on_bad=skip`` the other
        samples load and the bad one is listed in ``skipped`` with the same reason.
    read:  the input is unusual but valid: it is read as meant (the pixels are checked).
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

SIZE = 16  # files are written at the working size: loaded pixels compare exactly
N = 6      # images per layout: patients p0..p2, two images each; ids x0..x5


def ramp(i: int) -> np.ndarray:
    """A distinct grey image for image ``i``."""
    return ((np.arange(SIZE * SIZE).reshape(SIZE, SIZE) * 3 + 40 * i) % 256).astype(np.uint8)


def blob() -> np.ndarray:
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[4:11, 5:12] = 1
    return m


def write_image(path: Path, arr: np.ndarray, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)
    return path


# -- layouts: one valid data set per source, and where its parts are ------------------------------------------
@dataclass
class Layout:
    """A valid data set of one source in ``root``: its image / mask files (in record order), its table (if
    any) and how to build the source object. Corruptions edit the files, then ``source()`` reads them."""

    kind: str
    root: Path
    images: list[Path]
    masks: list[Path] = field(default_factory=list)
    table: Path | None = None
    path_column: str | None = None   # the table column naming image files (relative to ``path_base``)
    path_base: Path | None = None
    make: Callable[[], Any] | None = None
    dm_kw: dict[str, Any] = field(default_factory=dict)

    def source(self) -> Any:
        return self.make()

    def read(self) -> pd.DataFrame:
        return pd.read_csv(self.table, dtype=str, keep_default_na=False)

    def write(self, df: pd.DataFrame) -> None:
        df.to_csv(self.table, index=False)


def csv_layout(root: Path, ext: str = ".png") -> Layout:
    from medtrust.data.sources.csv import CsvSource

    rows, images, masks = [], [], []
    for i in range(N):
        images.append(write_image(root / "images" / f"x{i}{ext}", np.stack([ramp(i)] * 3, -1)))
        masks.append(write_image(root / "masks" / f"x{i}.png", blob() * 255))
        rows.append({"path": f"images/x{i}{ext}", "mask_path": f"masks/x{i}.png", "label": str(i % 2),
                     "patient_id": f"p{i // 2}", "split": ("train", "val", "test")[i // 2]})
    table = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    return Layout("csv", root, images, masks, table, "path", root, lambda: CsvSource(str(table)),
                  {"require_mask": True})


def folder_layout(root: Path, ext: str = ".png") -> Layout:
    from medtrust.data.sources.folder import FolderSource

    images = [write_image(root / "images" / f"x{i}{ext}", np.stack([ramp(i)] * 3, -1)) for i in range(N)]
    masks = [write_image(root / "masks" / f"x{i}.png", blob() * 255) for i in range(N)]
    return Layout("folder", root, images, masks, make=lambda: FolderSource(str(root)),
                  dm_kw={"require_mask": True, "splits": {"fractions": {"train": 0.34, "val": 0.33, "test": 0.33}}})


ISIC = {"train": ("ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"),
        "val": ("ISIC2018_Task1-2_Validation_Input", "ISIC2018_Task1_Validation_GroundTruth"),
        "test": ("ISIC2018_Task1-2_Test_Input", "ISIC2018_Task1_Test_GroundTruth")}


def isic_layout(root: Path, ext: str = ".jpg") -> Layout:
    from medtrust.data.sources.isic import IsicSource

    images, masks = [], []
    for i in range(N):
        inp, gt = ISIC[("train", "val", "test")[i // 2]]
        fmt = "JPEG" if ext == ".jpg" else None
        # JPEG is lossy: a flat grey per image keeps the loaded pixels exact enough to compare
        images.append(write_image(root / inp / f"ISIC_{i:07d}{ext}", np.full((SIZE, SIZE, 3), 40 * i, np.uint8), fmt))
        masks.append(write_image(root / gt / f"ISIC_{i:07d}_segmentation.png", blob() * 255))
    return Layout("isic2018", root, images, masks, make=lambda: IsicSource(str(root)), dm_kw={"require_mask": True})


def medmnist_layout(root: Path, **arrays: Any) -> Layout:
    from medtrust.data.sources.medmnist import MedMnistSource

    path = root / "m.npz"
    root.mkdir(parents=True, exist_ok=True)
    if not arrays:
        imgs = np.stack([ramp(i) for i in range(N)])
        lab = np.array([[i % 2] for i in range(N)])
        arrays = {f"{s}_{k}": v[2 * j:2 * j + 2] for j, s in enumerate(("train", "val", "test"))
                  for k, v in (("images", imgs), ("labels", lab))}
    np.savez(path, **arrays)
    return Layout("medmnist", root, [path], make=lambda: MedMnistSource(str(path)),
                  dm_kw={"require_mask": False, "channels": 1})


NIH_COLUMNS = ["Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender", "View Position"]


def nih_layout(root: Path, ext: str = ".png") -> Layout:
    from medtrust.data.sources.cxr_tables import NihChestXray14Source

    images, rows = [], []
    for i in range(N):
        images.append(write_image(root / "images_001" / "images" / f"x{i}{ext}", ramp(i)))
        rows.append([f"x{i}{ext}", "Pneumonia" if i % 2 else "No Finding", str(i // 2), "55", "F", "PA"])
    table = root / "Data_Entry_2017.csv"
    pd.DataFrame(rows, columns=NIH_COLUMNS).to_csv(table, index=False)
    return Layout("nih_chestxray14", root, images, table=table, make=lambda: NihChestXray14Source(str(table)),
                  dm_kw={"require_mask": False, "channels": 1,
                         "splits": {"fractions": {"train": 0.34, "val": 0.33, "test": 0.33}}})


def chexpert_layout(root: Path, ext: str = ".jpg") -> Layout:
    from medtrust.data.sources.cxr_tables import ChexpertSource

    images, rows = [], []
    for i in range(N):
        rel = f"CheXpert-v1.0-small/train/patient{i // 2:05d}/study1/view{i}_frontal{ext}"
        images.append(write_image(root / rel, np.full((SIZE, SIZE), 40 * i, np.uint8), "JPEG" if ext == ".jpg" else None))
        rows.append({"Path": rel, "Sex": "Female", "Age": "55", "Frontal/Lateral": "Frontal", "AP/PA": "PA",
                     "Pneumonia": str(float(i % 2))})
    table = root / "CheXpert-v1.0-small" / "train.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    return Layout("chexpert", root, images, table=table, path_column="Path", path_base=root,
                  make=lambda: ChexpertSource(str(table)),
                  dm_kw={"require_mask": False, "channels": 1,
                         "splits": {"fractions": {"train": 0.34, "val": 0.33, "test": 0.33}}})


def text_csv_layout(root: Path, ext: str = ".png") -> Layout:
    from medtrust.data.sources.text_csv import TextCsvSource

    images, rows = [], []
    for i in range(N):
        images.append(write_image(root / "img" / f"x{i}{ext}", ramp(i)))
        rows.append({"path": f"img/x{i}{ext}", "text": f"chest X-ray {i}", "modal": "cxr", "label": str(i % 2),
                     "patient_id": f"p{i // 2}", "split": ("train", "val", "test")[i // 2]})
    table = root / "prompts.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    return Layout("text_csv", root, images, table=table, path_column="path", path_base=root,
                  make=lambda: TextCsvSource(str(table), modalities=["cxr", "ct"]),
                  dm_kw={"require_mask": False, "channels": 1, "modalities": ["cxr", "ct"]})


LAYOUTS: dict[str, Callable[..., Layout]] = {
    "csv": csv_layout, "folder": folder_layout, "isic2018": isic_layout, "medmnist": medmnist_layout,
    "nih_chestxray14": nih_layout, "chexpert": chexpert_layout, "text_csv": text_csv_layout,
}
FILE_SOURCES = ("csv", "folder", "isic2018", "nih_chestxray14", "chexpert", "text_csv")
MASK_SOURCES = ("csv", "folder", "isic2018")
TABLE_SOURCES = ("csv", "nih_chestxray14", "chexpert", "text_csv")
PATH_COLUMN_SOURCES = ("csv", "chexpert", "text_csv")   # a table column names each file: ../ and absolute paths


# -- cases --------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One row of the matrix: build a valid layout, break it, and the outcome it must end in.

    ``expect``: substrings the error (and, for ``skip``, the skipped reason) must contain, after the layout's
    paths are substituted (``{file}`` the broken file, ``{table}`` the table, ``{root}`` the data root).
    ``check``: for ``read``, a check of the loaded split (``(images, masks, records) -> None``).
    """

    source: str
    name: str
    outcome: str
    corrupt: Callable[[Layout], dict[str, str]]
    expect: tuple[str, ...] = ()
    check: Callable[[Any, Layout], None] | None = None
    layout_kw: dict[str, Any] = field(default_factory=dict)
    dm_kw: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.source}-{self.name}"


def _subst(layout: Layout, broken: Path | None = None) -> dict[str, str]:
    return {"file": str(broken) if broken else "", "table": str(layout.table or ""), "root": str(layout.root)}


def zero_byte(lay: Layout) -> dict[str, str]:
    lay.images[0].write_bytes(b"")
    return _subst(lay, lay.images[0])


def truncated(lay: Layout) -> dict[str, str]:
    data = lay.images[0].read_bytes()
    lay.images[0].write_bytes(data[: len(data) // 2])
    return _subst(lay, lay.images[0])


def not_an_image(lay: Layout) -> dict[str, str]:
    lay.images[0].write_bytes(b"patient,notes\n1,this is a CSV saved with an image extension\n" * 4)
    return _subst(lay, lay.images[0])


def rgba(lay: Layout) -> dict[str, str]:
    rgb = np.stack([ramp(0), ramp(1), ramp(2)], -1)
    write_image(lay.images[0], np.concatenate([rgb, np.full((SIZE, SIZE, 1), 255, np.uint8)], -1), "PNG")
    return _subst(lay, lay.images[0])


def sixteen_bit(lay: Layout) -> dict[str, str]:
    arr = (np.arange(SIZE * SIZE).reshape(SIZE, SIZE) * 16).astype(np.uint16)  # 12-bit range 0..4080
    lay.images[0].parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(lay.images[0], format="PNG")
    return _subst(lay, lay.images[0])


def palette_image(lay: Layout) -> dict[str, str]:
    im = Image.fromarray((np.arange(SIZE * SIZE).reshape(SIZE, SIZE) % 4).astype(np.uint8), mode="P")
    im.putpalette([0, 0, 0, 90, 90, 90, 180, 180, 180, 255, 255, 255] + [0] * (256 * 3 - 12))
    im.save(lay.images[0], format="PNG")
    return _subst(lay, lay.images[0])


def mask_values(lay: Layout) -> dict[str, str]:
    m = blob() * 255
    m[0, :4] = 128
    write_image(lay.masks[0], m)
    return _subst(lay, lay.masks[0])


def palette_mask(lay: Layout) -> dict[str, str]:
    im = Image.fromarray(blob(), mode="P")
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))  # index 1 = a red lesion
    im.save(lay.masks[0], format="PNG")
    return _subst(lay, lay.masks[0])


def mask_size(lay: Layout) -> dict[str, str]:
    write_image(lay.masks[0], np.zeros((SIZE + 4, SIZE), np.uint8))
    return _subst(lay, lay.masks[0])


def _edit_table(fn: Callable[[pd.DataFrame], pd.DataFrame]) -> Callable[[Layout], dict[str, str]]:
    def corrupt(lay: Layout) -> dict[str, str]:
        lay.write(fn(lay.read()))
        return _subst(lay)
    return corrupt


def header_only(lay: Layout) -> dict[str, str]:
    lay.write(lay.read().iloc[:0])
    return _subst(lay)


def bom(lay: Layout) -> dict[str, str]:
    lay.table.write_bytes(b"\xef\xbb\xbf" + lay.table.read_bytes())
    return _subst(lay)


def semicolons(lay: Layout) -> dict[str, str]:
    lay.read().to_csv(lay.table, index=False, sep=";")
    return _subst(lay)


def ragged(lay: Layout) -> dict[str, str]:
    lines = lay.table.read_text().splitlines()
    lines[2] += ",extra,cells"
    lay.table.write_text("\n".join(lines) + "\n")
    return _subst(lay)


def short_row(lay: Layout) -> dict[str, str]:
    lines = lay.table.read_text().splitlines()
    lines[2] = lines[2].split(",")[0]
    lay.table.write_text("\n".join(lines) + "\n")
    return _subst(lay)


def _outside(lay: Layout) -> Path:
    """An image outside the data root (the pixels of image 0)."""
    target = lay.root.parent / f"{lay.root.name}_outside" / lay.images[0].relative_to(lay.root)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(lay.images[0], target)
    return target


def dotdot(lay: Layout) -> dict[str, str]:
    target = _outside(lay)
    df = lay.read()
    df.loc[0, lay.path_column] = os.path.relpath(target, lay.path_base)
    lay.write(df)
    return _subst(lay, target)


def absolute(lay: Layout) -> dict[str, str]:
    target = _outside(lay)
    df = lay.read()
    df.loc[0, lay.path_column] = str(target)
    lay.write(df)
    return _subst(lay, target)


def symlink_out(lay: Layout) -> dict[str, str]:
    target = _outside(lay)
    lay.images[0].unlink()
    lay.images[0].symlink_to(target)
    return _subst(lay, target)


def empty_dataset(lay: Layout) -> dict[str, str]:
    if lay.table is not None:
        return header_only(lay)
    for p in lay.images:
        p.unlink()
    return _subst(lay)


def _first_image_equals(expected: Callable[[], np.ndarray]) -> Callable[[Any, Layout], None]:
    def check(loaded: Any, lay: Layout) -> None:
        images, _, recs = loaded
        i = next(k for k, r in enumerate(recs) if Path(r["path"]).name == lay.images[0].name)
        got = images[i].numpy()
        want = expected()
        want = want[None] if want.ndim == 2 else want.transpose(2, 0, 1)
        if got.shape[0] != want.shape[0]:  # the source's channels: grey files read as RGB, or RGB as grey
            want = np.repeat(want, got.shape[0], 0) if want.shape[0] == 1 else np.rint(
                np.tensordot([0.299, 0.587, 0.114], want.astype(float), 1))[None]
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, (got[0, :2, :6], want[0, :2, :6])
    return check


def _rgba_expected() -> np.ndarray:
    return np.stack([ramp(0), ramp(1), ramp(2)], -1)


def _sixteen_expected() -> np.ndarray:
    a = np.arange(SIZE * SIZE).reshape(SIZE, SIZE) * 16.0
    return np.rint(a / a.max() * 255).astype(np.uint8)


def _palette_expected() -> np.ndarray:
    return np.array([0, 90, 180, 255], np.uint8)[np.arange(SIZE * SIZE).reshape(SIZE, SIZE) % 4]


def _mask_is_blob(loaded: Any, lay: Layout) -> None:
    _, masks, recs = loaded
    i = next(k for k, r in enumerate(recs) if Path(r["mask_path"]).name == lay.masks[0].name)
    assert np.array_equal(masks[i].numpy()[0], blob()), "palette index 1 must be the lesion"


def _outside_read(loaded: Any, lay: Layout) -> None:
    images, _, recs = loaded
    assert any(f"{lay.root.name}_outside" in str(Path(r["path"]).resolve()) for r in recs)


def _bom_read(loaded: Any, lay: Layout) -> None:
    assert len(loaded[2]) >= 1


def _npz(**fix: Any) -> Callable[[Layout], dict[str, str]]:
    """Rewrite the npz with the train split replaced by ``fix``'s arrays."""
    def corrupt(lay: Layout) -> dict[str, str]:
        with np.load(lay.images[0]) as d:
            arrays = {k: d[k] for k in d.files}
        arrays.update(fix)
        np.savez(lay.images[0], **arrays)
        return _subst(lay, lay.images[0])
    return corrupt


def _npz_nan() -> dict[str, Any]:
    imgs = np.stack([ramp(0), ramp(1)]).astype(np.float32)
    imgs[1, 3, 3] = np.nan
    return {"train_images": imgs}


def _npz_object(lay: Layout) -> dict[str, str]:
    with np.load(lay.images[0]) as d:
        arrays = {k: d[k] for k in d.files}
    arrays["train_images"] = np.array([ramp(0), "not pixels"], dtype=object)
    np.savez(lay.images[0], **arrays)  # allow_pickle is needed to READ it: the loader never allows it
    return _subst(lay, lay.images[0])


def _npz_truncated(lay: Layout) -> dict[str, str]:
    data = lay.images[0].read_bytes()
    lay.images[0].write_bytes(data[: len(data) // 3])
    return _subst(lay, lay.images[0])


def _npz_uint16_check(loaded: Any, lay: Layout) -> None:
    got = np.concatenate([im.numpy()[0].ravel() for im in loaded[0][:2]])  # the two train images, one ramp
    assert got.min() == 0 and got.max() == 255, "uint16 pixels are rescaled from their range"
    assert (np.diff(got.astype(int)) >= 0).all(), "a ramp stays a ramp: wrapping modulo 256 would break it"


def _npz_empty(lay: Layout) -> dict[str, str]:
    np.savez(lay.images[0], other=np.zeros(3))
    return _subst(lay, lay.images[0])


def _empty_split(lay: Layout) -> dict[str, str]:
    """No image in val (the split the training needs for checkpoint selection)."""
    if lay.kind == "medmnist":
        return _npz(val_images=np.zeros((0, SIZE, SIZE), np.uint8), val_labels=np.zeros((0, 1), np.int64))(lay)
    if lay.kind == "isic2018":
        for p in lay.images[2:4]:
            p.unlink()
        for p in lay.masks[2:4]:
            p.unlink()
        return _subst(lay)
    if lay.kind in ("csv", "text_csv"):
        return _edit_table(lambda d: d.assign(split=d["split"].replace("val", "train")))(lay)
    lay.dm_kw["splits"] = {"fractions": {"train": 0.5, "val": 0.0, "test": 0.5}}
    return _subst(lay)


def _duplicate(lay: Layout) -> dict[str, str]:
    return _edit_table(lambda d: pd.concat([d, d.iloc[[1]]], ignore_index=True))(lay)


def _drop(col: str) -> Callable[[Layout], dict[str, str]]:
    return _edit_table(lambda d: d.drop(columns=[col]))


def _cell(col: str, value: str, row: int = 1) -> Callable[[Layout], dict[str, str]]:
    def fn(d: pd.DataFrame) -> pd.DataFrame:
        d.loc[row, col] = value
        return d
    return _edit_table(fn)


def _rename_ext(lay_kw: str) -> dict[str, Any]:
    return {"ext": lay_kw}


IMAGE_SOURCE_PATH = {"csv": "path", "chexpert": "Path", "text_csv": "path", "nih_chestxray14": "Image Index"}
LABEL_CELL = {"csv": ("label", "abc", ("row 3", "label 'abc'")),
              "nih_chestxray14": ("Patient Age", "abc", ("row 3", "Patient Age='abc'", "not an age")),
              "chexpert": ("Pneumonia", "maybe", ("row 3", "Pneumonia='maybe'", "expected 1, 0, -1")),
              "text_csv": ("label", "abc", ("row 3", "label 'abc'", "not an integer"))}
BLANK_CELL = {"csv": ("path", ("row 3", "empty 'path' cell")),
              "nih_chestxray14": ("Patient ID", ("row 3", "empty 'Patient ID'")),
              "chexpert": ("Path", ("row 3",)),
              "text_csv": ("text", ("row 3", "empty 'text' cell"))}
MISSING_COLUMN = {"csv": "path", "nih_chestxray14": "Finding Labels", "chexpert": "Path", "text_csv": "modal"}


def cases() -> list[Case]:
    out: list[Case] = []
    for s in FILE_SOURCES:
        jpeg = {"ext": ".jpg"} if s not in ("isic2018", "chexpert") else {}
        png = {"ext": ".png"} if s in ("isic2018", "chexpert") else {}
        out += [
            Case(s, "zero_byte", "skip", zero_byte, ("{file}", "empty (0 bytes)")),
            Case(s, "truncated_png", "skip", truncated, ("{file}", "unreadable or corrupt"), layout_kw=png),
            Case(s, "truncated_jpeg", "skip", truncated, ("{file}", "unreadable or corrupt"), layout_kw=jpeg),
            Case(s, "not_an_image", "skip", not_an_image, ("{file}", "unreadable or corrupt")),
            Case(s, "rgba_png", "read", rgba, check=_first_image_equals(_rgba_expected), layout_kw=png),
            Case(s, "16bit_png", "read", sixteen_bit, check=_first_image_equals(_sixteen_expected), layout_kw=png),
            Case(s, "palette_png", "read", palette_image, check=_first_image_equals(_palette_expected), layout_kw=png),
            Case(s, "symlink_out", "skip", symlink_out, ("outside the data root", "data.allow_outside_root")),
            Case(s, "symlink_out_allowed", "read", symlink_out, check=_outside_read,
                 dm_kw={"allow_outside_root": True}),
        ]
    for s in MASK_SOURCES:
        out += [
            Case(s, "mask_values_0_128_255", "skip", mask_values, ("{file}", "128", "expected")),
            Case(s, "palette_mask", "read", palette_mask, check=_mask_is_blob),
            Case(s, "mask_size_differs", "skip", mask_size, ("{file}", "size")),
        ]
    for s in TABLE_SOURCES:
        col, val, msg = LABEL_CELL[s]
        bcol, bmsg = BLANK_CELL[s]
        out += [
            Case(s, "missing_column", "error", _drop(MISSING_COLUMN[s]),
                 ("{table}", "missing column", MISSING_COLUMN[s])),
            Case(s, "duplicate_id", "error", _duplicate, ("{table}", "row 3", "row 8")),
            Case(s, "blank_cell", "skip" if s == "text_csv" else "error", _cell(bcol, ""), ("{table}", *bmsg)),
            Case(s, "wrong_type", "skip" if s == "text_csv" else "error", _cell(col, val), ("{table}", *msg)),
            Case(s, "bom", "read", bom, check=_bom_read),
            Case(s, "semicolon_delimiter", "error", semicolons, ("{table}", "semicolon-separated", "comma")),
            Case(s, "long_row", "error", ragged, ("{table}", "line 3", "more fields")),
            Case(s, "short_row", "error", short_row, ("{table}", "line 3", "fewer fields")),
        ]
    for s in PATH_COLUMN_SOURCES:
        out += [
            Case(s, "dotdot_path", "skip", dotdot, ("{table}", "outside the data root", "data.allow_outside_root")),
            Case(s, "absolute_path", "skip", absolute, ("{table}", "outside the data root")),
            Case(s, "dotdot_path_allowed", "read", dotdot, check=_outside_read, dm_kw={"allow_outside_root": True}),
        ]
    for s in LAYOUTS:
        out.append(Case(s, "empty_dataset", "error", empty_dataset if s != "medmnist" else _npz_empty,
                        ("{table}",) if s in TABLE_SOURCES else ("{root}",)))
        out.append(Case(s, "empty_split", "error", _empty_split,
                        ("no images", "split 'val'") if s == "isic2018" else ("split 'val' is empty",)))
    out += [
        Case("medmnist", "nan_pixels", "error", _npz(**_npz_nan()), ("{file}", "train_images[1]", "NaN/Inf")),
        Case("medmnist", "inf_pixels", "error",
             _npz(train_images=np.where(np.eye(SIZE, dtype=bool), np.inf, 1.0)[None].repeat(2, 0)),
             ("{file}", "train_images[0]", "NaN/Inf")),
        Case("medmnist", "object_array", "error", _npz_object, ("{file}", "train_images", "pickle")),
        Case("medmnist", "truncated_npz", "error", _npz_truncated, ("{file}", "not a readable .npz")),
        Case("medmnist", "uint16_pixels", "read",
             _npz(train_images=(np.arange(2 * SIZE * SIZE).reshape(2, SIZE, SIZE) * 16).astype(np.uint16)),
             check=_npz_uint16_check),
        Case("medmnist", "labels_count_differs", "error", _npz(train_labels=np.array([[0]])),
             ("{file}", "train_images has 2 images but train_labels has 1")),
    ]
    return out


CASES = cases()


def build(case: Case, tmp: Path) -> tuple[Layout, dict[str, str]]:
    lay = LAYOUTS[case.source](tmp / "data", **case.layout_kw)
    where = case.corrupt(lay)
    lay.dm_kw.update(case.dm_kw)
    _split_seed(lay)
    return lay, where


def _split_seed(lay: Layout) -> None:
    """For a layout whose splits are computed (patient hash), a split seed that gives every split with a
    fraction > 0 at least two images: six images cannot fill three splits under every seed, and a case must
    test its bad input, not an accidentally empty split."""
    from medtrust.data.records import DataError
    from medtrust.data.splits import make_splits

    sp = lay.dm_kw.get("splits")
    if not sp or "fractions" not in sp:
        return
    try:
        records = lay.source().records()
    except DataError:
        return  # the case's error comes from the records themselves
    wanted = [s for s, f in sp["fractions"].items() if f > 0]
    for seed in range(200):
        split, _ = make_splits(records, sp["fractions"], seed, use_source=False)
        if all(len(split.get(s, [])) >= 2 for s in wanted):
            lay.dm_kw["splits"] = {**sp, "seed": seed, "use_source": False}
            return
    raise AssertionError(f"no split seed gives every split two of {len(records)} images")


def datamodule(lay: Layout, on_bad: str) -> Any:
    from medtrust.data.datamodule import ImageDataModule

    kw = {"image_size": SIZE, "channels": 3, "num_classes": 2, "normalize": None, "load_threads": 1,
          "duplicates": "report", **lay.dm_kw}
    return ImageDataModule(lay.source(), on_bad=on_bad, **kw)


def load_all(dm: Any) -> dict[str, Any]:
    return {s: dm.load_split(s) for s in ("train", "val", "test")}  # an empty split is refused by name


def run(case: Case, tmp: Path) -> str:
    """Run ``case`` in ``tmp`` and return how it ended (``error`` / ``skip`` / ``read``); raises AssertionError
    when it ends otherwise than ``case.outcome`` or the message does not name what it must."""
    from medtrust.data.records import DataError

    lay, where = build(case, tmp)
    expect = [e.format(**where) for e in case.expect]
    try:
        loaded = load_all(datamodule(lay, "error"))
    except DataError as err:
        msg = str(err)
        assert case.outcome in ("error", "skip"), f"{case.id}: refused, but it is valid input: {msg}"
        missing = [e for e in expect if e not in msg]
        assert not missing, f"{case.id}: the error does not name {missing}:\n{msg}"
        assert "Traceback" not in msg and len(msg) < 2000, msg
    else:
        assert case.outcome == "read", f"{case.id}: expected a DataError, but it loaded"
        first = next(v for v in loaded.values() if any(Path(str(r.get("path", "")).split("#")[0]).name ==
                                                        lay.images[0].name for r in v[2]))
        case.check(first, lay)
        return "read"
    # under on_bad=skip: a bad sample is skipped and counted; a bad source still stops
    dm = datamodule(lay, "skip")
    try:
        load_all(dm)
    except DataError as err:
        assert case.outcome == "error", f"{case.id}: on_bad=skip should skip the one bad sample, got: {err}"
        return "error"
    assert case.outcome == "skip", f"{case.id}: a source-level error must stop even under on_bad=skip"
    assert len(dm.skipped) == 1, dm.skipped
    reason = dm.skipped[0]["reason"]
    missing = [e for e in expect if e not in reason]
    assert not missing, f"{case.id}: the skipped reason does not name {missing}:\n{reason}"
    return "skip"


def summary() -> pd.DataFrame:
    """Run every case (in a temporary folder) and count outcomes per source."""
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, case in enumerate(CASES):
            got = run(case, Path(tmp) / str(k))
            rows.append({"source": case.source, "case": case.name, "outcome": got})
    return pd.DataFrame(rows)


if __name__ == "__main__":
    import logging

    logging.disable(logging.WARNING)  # the skips' warnings: the table is the output
    df = summary()
    table = df.pivot_table(index="source", columns="outcome", values="case", aggfunc="count", fill_value=0)
    table.loc["all"] = table.sum()
    print(f"{len(df)} data cases over {df.source.nunique()} sources:\n{table.to_string()}")
