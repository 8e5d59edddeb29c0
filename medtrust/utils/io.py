"""Atomic file writes: a reader never sees a half-written file."""
from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


class DiskFullError(OSError):
    """No space (or quota) left while writing a result: the file named was not written, its previous version
    (if any) is intact."""


FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``.

    Args:
        path: destination file.
        data: bytes to write.

    Returns:
        The destination path.

    Raises:
        DiskFullError: the device or quota is full (the temporary file is removed, ``path`` is untouched).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600; results should be readable like any file
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.errno in FULL_ERRNOS:
            raise DiskFullError(err.errno, f"no space left on the device writing {path} ({len(data)} bytes; "
                                f"{os.strerror(err.errno)}); its previous version, if any, is intact: free space "
                                f"(df -h {path.parent}) and run again, or resume a training run") from None
        raise
    return path


def load_tensors(path: str | Path, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)``: tensors, containers and plain values only. Every file the project
    loads with torch (checkpoints, anomaly statistics, evaluator weights) goes through here, so a file received
    from someone else cannot run code, and a bad one is named.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a truncated or corrupt file, or one holding Python objects other than tensors and plain
            values (a pickle payload is refused before anything in it runs), naming the file.
    """
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path}: refused: this {what} holds Python objects other than tensors and plain values, "
                         "which loading would have to execute (torch.load weights_only=True); a file from "
                         f"elsewhere may carry code. ({str(err).splitlines()[0][:300]})") from None
    except Exception as err:  # noqa: BLE001 - zip / EOF / runtime errors differ across torch versions
        size = path.stat().st_size
        raise ValueError(f"{path}: not a readable {what} ({size} bytes; truncated or corrupt?): "
                         f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}") from None


def _jsonable(obj: Any) -> Any:
    """Convert numpy/torch scalars and non-finite floats into JSON-safe values."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON (NaN/inf become ``null``)."""
    text = json.dumps(_jsonable(obj), indent=2, sort_keys=False)
    return atomic_write_bytes(path, (text + "\n").encode())


def read_json(path: str | Path) -> Any:
    """Read a JSON file."""
    with open(path) as fh:
        return json.load(fh)


def write_csv(path: str | Path, frame: Any) -> Path:
    """Atomically write a pandas DataFrame as CSV (no index)."""
    return atomic_write_bytes(path, frame.to_csv(index=False).encode())
