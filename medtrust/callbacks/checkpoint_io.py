"""Checkpoint writing that never leaves a half-written file behind."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from medtrust.utils.io import atomic_write_bytes


class AtomicCheckpointIO(TorchCheckpointIO):
    """Serialise to memory, write to a temporary file in the same folder, then ``os.replace``.

    A crash or SIGKILL mid-save leaves the previous ``last.ckpt``/``best.ckpt`` intact instead of a
    truncated file.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        atomic_write_bytes(path, buf.getvalue())
