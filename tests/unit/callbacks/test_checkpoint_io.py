"""Checkpoints are written atomically: a failed save leaves the previous file intact."""
from __future__ import annotations

import pytest
import torch

from medtrust.callbacks.checkpoint_io import AtomicCheckpointIO


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, path)

    import medtrust.utils.io as uio

    monkeypatch.setattr(uio.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(2)}}, path)
    monkeypatch.undo()
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["state_dict"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_written_files_get_normal_permissions(tmp_path):
    import os
    import stat

    AtomicCheckpointIO().save_checkpoint({"a": 1}, tmp_path / "x.ckpt")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "x.ckpt").stat().st_mode) == 0o666 & ~umask
