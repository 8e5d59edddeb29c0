"""Records and their loading.

A *record* (:class:`Record`) is a plain dict describing one sample; sources produce records and
:func:`load_record` turns one into arrays at the working resolution, raising :class:`DataError`
naming the file and what was expected.
"""
from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
from PIL import Image, UnidentifiedImageError


class _RequiredRecord(TypedDict):
    id: str
    path: str
    mask_path: str | None
    label: int | None
    patient_id: str
    split: str | None
    attrs: dict[str, str]


class Record(_RequiredRecord, total=False):
    """One sample, as every source returns it (a plain dict at run time).

    Keys every source sets (the value may be ``None``):

    - ``id``: unique within the source and stable across runs: the path relative to the source's
      root in POSIX form with its extension (CSV: the manifest's folder, folder: ``root``;
      ``images/a/x.png``), or an official/generated id that is unique (ISIC ``ISIC_0000000``,
      MedMNIST ``<split>_<i>``, phantoms ``derm_00003``). Files named after it go through
      :func:`medtrust.utils.names.safe_filename`. The datamodule refuses duplicates.
    - ``path``: the image file, or a pseudo-path for in-memory images (``file.npz#train_images[3]``,
      ``phantom_derm://<seed>/<i>``), used in messages and failure-case exports.
    - ``mask_path``: the mask file, or ``None``.
    - ``label``: class index, or ``None`` (unlabelled).
    - ``patient_id``: the unit of patient-level splits (an image without one is its own patient).
    - ``split``: ``train``/``val``/``test`` from the source, or ``None`` (computed splits).
    - ``attrs``: demographic/metadata attributes, str -> str (``sex``, ``age_group``, ...).

    Optional keys:

    - ``where``: the manifest row (``manifest.csv row 7``) for messages.
    - ``error``: why the sample is unusable (missing file, ...); raised, or skipped under
      ``data.on_bad=skip``, when the split is loaded.
    - ``image``, ``mask``: in-memory arrays (phantoms, MedMNIST): uint8 H×W×C (or H×W) and uint8
      H×W in {0, 1}.
    - ``text``, ``modality``: report/prompt and modality index (into ``data.modalities``) of
      multimodal sources (``phantom_multimodal``, ``text_csv``, ``generated``); the batch carries both.
    - ``reward``: a generated image's score (e.g. its selector score) for rating-driven fine-tuning;
      the batch carries it.
    - ``quality``: the known acquisition grade of a phantom image (3 good, 2 fair, 1 poor), for the
      quality loop's checks; never shown to a model.
    """

    where: str
    error: str
    image: np.ndarray
    mask: np.ndarray
    text: str
    modality: int
    reward: float
    quality: int


SPLIT_ALIASES = {
    "train": "train", "training": "train", "tr": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test", "holdout": "test",
}
SPLITS = ("train", "val", "test")
# "cal": an optional calibration split carved out of train (data.splits.calibration_fraction)
ALL_SPLITS = (*SPLITS, "cal")


class DataError(ValueError):
    """Bad input data: the message names the file, row or key and what was expected."""


class RealPaths:
    """``os.path.realpath`` of many files in few folders: each folder is resolved once, then a file costs one
    ``lstat`` (a symlinked file is resolved fully). A million manifest rows in a thousand folders: seconds."""

    def __init__(self) -> None:
        self._dirs: dict[str, str] = {}

    def folder(self, d: str | Path) -> str:
        """``os.path.realpath`` of folder ``d``, resolved once."""
        d = os.fspath(d)
        rd = self._dirs.get(d)
        if rd is None:
            rd = self._dirs[d] = os.path.realpath(d)
        return rd

    def real(self, path: str | Path) -> tuple[str, bool]:
        """(the resolved path, whether it exists)."""
        d, name = os.path.split(os.fspath(path))
        full = os.path.join(self.folder(d), name)
        try:
            st = os.lstat(full)
        except OSError:
            return full, False
        if stat.S_ISLNK(st.st_mode):
            full = os.path.realpath(full)
            return full, os.path.exists(full)
        return full, True


def outside_root(record: Record, root: str | Path, paths: RealPaths | None = None) -> str | None:
    """Why ``record`` reads a file outside the data root ``root`` (a ``../`` path, an absolute path or a symlink
    whose target lies elsewhere, after resolving every link), or None when its image and mask are inside."""
    paths = paths or RealPaths()
    base = paths.folder(root)  # once per root, not once per record
    for key in ("path", "mask_path"):
        p = record.get(key)
        if not p or (key == "path" and "image" in record):
            continue
        real, _ = paths.real(p)
        if not (real == base or real.startswith(base.rstrip(os.sep) + os.sep)):
            return (f"{record.get('where') or record.get('id')}: {'image' if key == 'path' else 'mask'} {p} resolves to "
                    f"{real}, outside the data root {base} (a '../' or absolute path, or a symlink out); set "
                    "data.allow_outside_root=true to read files outside the data root")
    return None


def normalise_split(value: Any, where: str) -> str:
    """Map a split spelling (``Training``, ``valid``, …) to ``train``/``val``/``test``.

    Raises:
        DataError: if ``value`` is empty or not a known spelling; ``where`` names the row.
    """
    text = "" if value is None else str(value).strip().lower()
    if text in ("", "nan", "none"):
        raise DataError(f"{where}: empty split value; expected one of train/val/test")
    if text not in SPLIT_ALIASES:
        raise DataError(
            f"{where}: unknown split {value!r}; expected one of {sorted(set(SPLIT_ALIASES))}"
        )
    return SPLIT_ALIASES[text]


HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # 16-bit, 32-bit integer and float images


def _open(path: Path, what: str, decode: bool = True) -> Image.Image | tuple[int, int]:
    """The decoded image (still in its own mode), or with ``decode=False`` only its (W, H) from the header; a
    DataError naming the file when it is missing, empty, not an image or corrupt."""
    if not path.exists():
        raise DataError(f"{what} not found: {path}")
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"{what} file is empty (0 bytes): {path}; expected an image (an interrupted copy or download?)")
    try:
        with Image.open(path) as im:
            if not decode:
                return im.size
            im.load()  # decode fully so truncated/corrupt files fail here, not mid-training
            return im.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{what} is unreadable or corrupt: {path} ({type(err).__name__}: {err})") from err


def rescale_to_uint8(arr: np.ndarray, where: str) -> np.ndarray:
    """A 16-bit, 32-bit or float array mapped linearly from its own minimum..maximum to 0..255 (a
    constant image maps to 0). Medical 16-bit files rarely use the full 0..65535 range (12-bit CT/CR data,
    DICOM exports), so dividing by 257 would leave them nearly black; converting the way PIL does clips
    everything above 255 to white.

    Raises:
        DataError: NaN or Inf values.
    """
    a = np.asarray(arr, dtype=np.float64)
    if not np.isfinite(a).all():
        raise DataError(f"{where}: {int((~np.isfinite(a)).sum())} NaN/Inf pixel value(s); expected finite values")
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    return np.zeros(a.shape, np.uint8) if hi <= lo else np.rint((a - lo) / (hi - lo) * 255).astype(np.uint8)


def read_image(path: str | Path, channels: int) -> np.ndarray:
    """Read an image file as uint8 H×W×C (``channels`` 1 = grayscale, 3 = RGB).

    8-bit, palette, RGBA (alpha dropped) and CMYK files are converted by PIL; 16-bit, 32-bit and float
    files are rescaled from their own range (:func:`rescale_to_uint8`), never clipped or wrapped.

    Raises:
        DataError: missing, unreadable, corrupt or non-finite file.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    im = _open(Path(path), "image")
    if im.mode in HIGH_DEPTH_MODES:
        arr = rescale_to_uint8(np.asarray(im), f"image {path}")
        return arr[..., None] if channels == 1 else np.repeat(arr[..., None], 3, axis=-1)
    arr = np.asarray(im.convert("RGB" if channels == 3 else "L"), dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def check_mask_values(arr: np.ndarray, where: str) -> np.ndarray:
    """``arr`` unchanged if its values are {0, 1} or {0, 255} (or a subset).

    Raises:
        DataError: any other value (an anti-aliased, JPEG-compressed or multi-class mask): binarise it first.
    """
    values = np.unique(arr)
    if set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}:
        return arr
    shown = ", ".join(str(v) for v in values[:8].tolist()) + (", ..." if len(values) > 8 else "")
    raise DataError(f"{where}: mask values [{shown}]; expected a binary mask with values {{0, 255}} or {{0, 1}} "
                    "(an anti-aliased, JPEG-compressed or multi-class mask must be binarised first)")


def binarise_mask(arr: np.ndarray) -> np.ndarray:
    """Binarise a mask array: values > 127 for 8-bit masks (0/255), > 0 for 0/1 masks."""
    thr = 127 if arr.max(initial=0) > 1 else 0
    return (arr > thr).astype(np.uint8)


def read_mask(path: str | Path) -> np.ndarray:
    """Read a binary mask file as uint8 H×W in {0, 1}.

    A palette mask is read by its indices (0 background, 1 lesion), a colour mask by its brightest channel
    (a red lesion on black is a lesion), never through PIL's luminance conversion (which makes a red or a
    palette-index-1 lesion darker than the 0/255 threshold: an empty mask).

    Raises:
        DataError: missing, unreadable or corrupt file, or values other than {0, 1} / {0, 255}.
    """
    im = _open(Path(path), "mask")
    if im.mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr", "HSV", "LAB", "RGBX"):
        arr = np.asarray(im.convert("RGB")).max(axis=-1)
    elif im.mode == "1":
        arr = np.asarray(im.convert("L"))
    else:  # L, P (indices), I;16, I, F
        arr = np.asarray(im)
    return binarise_mask(check_mask_values(arr, f"mask {path}"))


def resize_image(arr: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Resize uint8 H×W×C to ``size`` = (H, W) with antialiased bilinear interpolation."""
    h, w = int(size[0]), int(size[1])
    if arr.shape[:2] == (h, w):
        return arr
    chans = [np.asarray(Image.fromarray(arr[..., c]).resize((w, h), Image.BILINEAR)) for c in range(arr.shape[2])]
    return np.stack(chans, axis=-1)


RESIZE_MODES = ("stretch", "pad")


def pad_to_aspect(arr: np.ndarray, size: Sequence[int], fill: int = 0) -> np.ndarray:
    """Pad H×W(×C) with ``fill`` (centred) to the aspect ratio of ``size`` = (H, W), so that a later
    resize to ``size`` keeps the image's aspect ratio (letterboxing, not stretching)."""
    h, w = arr.shape[:2]
    th, tw = int(size[0]), int(size[1])
    if h * tw == w * th:
        return arr
    if w * th > h * tw:  # too wide: pad rows
        new_h, new_w = -(-w * th // tw), w
    else:
        new_h, new_w = h, -(-h * tw // th)
    out = np.full((new_h, new_w, *arr.shape[2:]), fill, dtype=arr.dtype)
    y0, x0 = (new_h - h) // 2, (new_w - w) // 2
    out[y0:y0 + h, x0:x0 + w] = arr
    return out


def resize_mask(mask: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Resize a {0,1} mask to (H, W): bilinear on 0/255 then threshold at half, which keeps
    boundaries smoother than nearest-neighbour when downsampling."""
    h, w = int(size[0]), int(size[1])
    if mask.shape[:2] == (h, w):
        return mask.astype(np.uint8)
    im = Image.fromarray((mask * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
    return (np.asarray(im) >= 128).astype(np.uint8)


def peek_record(record: Record) -> None:
    """The cheap check of a record read later (``data.cache=false``): its files exist, are not empty, and their
    headers are images whose sizes agree; pixels (and mask values) are checked when they are read.

    Raises:
        DataError: naming the file, as :func:`load_record` would.
    """
    if record.get("error"):
        raise DataError(record["error"])
    if "image" in record:
        return
    sizes = [_open(Path(record[key]), what, decode=False)
             for key, what in (("path", "image"), ("mask_path", "mask")) if record.get(key)]
    if len(sizes) == 2 and sizes[0] != sizes[1]:
        raise DataError(f"{record['mask_path']}: mask size {sizes[1][0]}x{sizes[1][1]} (WxH) differs from its image "
                        f"{record['path']} size {sizes[0][0]}x{sizes[0][1]}; expected the same size")


def load_record(
    record: Record, image_size: Sequence[int], channels: int, require_mask: bool, resize: str = "stretch"
) -> tuple[np.ndarray, np.ndarray | None]:
    """Load one record at the working resolution.

    Args:
        record: a record dict (file paths or in-memory ``image``/``mask`` arrays).
        image_size: (H, W) of the working resolution.
        channels: 1 or 3.
        require_mask: raise if the record has no mask.
        resize: ``stretch`` (to ``image_size`` whatever the aspect ratio) or ``pad`` (keep the aspect
            ratio: pad with black, centred, then resize; masks are padded with 0 alike).

    Returns:
        ``(image, mask)``: uint8 C×H×W and uint8 1×H×W in {0,1} (``mask`` is ``None`` when absent).

    Raises:
        DataError: missing/corrupt file, missing mask, or image/mask size mismatch.
    """
    if record.get("error"):
        raise DataError(record["error"])
    if "image" in record:
        img = np.asarray(record["image"], dtype=np.uint8)
        img = img[..., None] if img.ndim == 2 else img
        mask = record.get("mask")
        where = record.get("path", record.get("id", "?"))
    else:
        img = read_image(record["path"], channels)
        mask_path = record.get("mask_path")
        mask = read_mask(mask_path) if mask_path else None
        where = record["path"]
    if img.shape[2] != channels:
        raise DataError(f"{where}: image has {img.shape[2]} channels, expected {channels}")
    if mask is None:
        if require_mask:
            raise DataError(f"{where}: image has no mask (mask_path is empty) but the task needs masks")
    else:
        mask = np.asarray(mask, dtype=np.uint8)
        if mask.shape[:2] != img.shape[:2]:
            raise DataError(
                f"{record.get('mask_path', where)}: mask size {mask.shape[1]}x{mask.shape[0]} (WxH) differs "
                f"from its image {where} size {img.shape[1]}x{img.shape[0]}; expected the same size"
            )
        mask = binarise_mask(check_mask_values(mask, f"mask of {where}"))
        mask = resize_mask(pad_to_aspect(mask, image_size) if resize == "pad" else mask, image_size)[None]
    if resize == "pad":
        img = pad_to_aspect(img, image_size)
    img = resize_image(img, image_size).transpose(2, 0, 1).copy()
    return img, mask
