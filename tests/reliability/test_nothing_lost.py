"""Nothing is lost under load: a process killed during saves leaves the previous checkpoint and metrics intact; a
full disk ends a run with a message naming the file, the run marked failed with the checkpoint it had; runs
started at the same moment never share a folder."""
from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medtrust.callbacks.checkpoint_io import AtomicCheckpointIO
from medtrust.utils.io import load_tensors, write_json
from tests.conftest import ROOT, TINY, TINY_MODEL, refused


def _saver(folder: Path, start: int) -> None:
    """The child: save checkpoint k (a 4 MB tensor filled with k) and metrics k, for k = start, start + 1, ...
    (imported before the fork: the child saves from its first millisecond)"""
    io = AtomicCheckpointIO()
    k = start
    while True:
        io.save_checkpoint({"k": k, "state_dict": {"w": torch.full((1 << 20,), float(k))}}, folder / "last.ckpt")
        write_json(folder / "metrics.json", {"k": k, "rows": list(range(2000))})
        k += 1


def _check(folder: Path, before: tuple[int, int]) -> tuple[int, int]:
    """The saves on disk: complete, and never older than ``before`` (checkpoint k, metrics k)."""
    ckpt = load_tensors(folder / "last.ckpt")
    k = int(ckpt["k"])
    assert bool((ckpt["state_dict"]["w"] == k).all()), "a checkpoint mixes two saves"
    metrics = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").exists() else {"k": 0}
    assert len(metrics.get("rows", range(2000))) == 2000, "truncated metrics"
    now = (k, int(metrics["k"]))
    assert now[0] >= before[0] and now[1] >= before[1], f"went back from {before} to {now}"
    return now


def test_sigkill_at_random_points_during_saves_leaves_the_last_ones_intact(tmp_path):
    """20 rounds: a forked process saves in a loop and is SIGKILLed at a random moment (seeded); every time the
    checkpoint and the metrics on disk are complete, and never older than what was there before the round."""
    rng = random.Random(0)
    done = (0, 0)
    for _ in range(20):
        pid = os.fork()
        if pid == 0:  # child: never returns into pytest
            try:
                _saver(tmp_path, max(done) + 1)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.05, 0.5))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        if (tmp_path / "last.ckpt").exists():
            done = _check(tmp_path, done)
    assert min(done) > 5, "the saver should have completed several saves"
    # a kill mid-save leaves at most a hidden temporary file beside the results, never a half-written result
    assert {p.name for p in tmp_path.iterdir() if not p.name.startswith(".")} == {"last.ckpt", "metrics.json"}


def test_a_full_disk_names_the_file_and_the_run_keeps_what_it_had(tmp_path, monkeypatch):
    """The disk fills up while the second epoch's last.ckpt is written (os.fsync raises ENOSPC, as a full
    device does): train.py stops with one message naming the file, status.json says failed with the error, and
    the first epoch's last.ckpt is still there and loads."""
    run = tmp_path / "run"
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        name = os.readlink(f"/proc/self/fd/{fd}")
        if ".last.ckpt." in name and (run / "checkpoints" / "last.ckpt").exists():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    proc = refused("train.py", *TINY, "trainer.max_epochs=2", f"hydra.run.dir={run}")
    assert "no space left on the device writing" in proc.stderr and str(run / "checkpoints" / "last.ckpt") in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "failed" and "DiskFullError" in status["error"]
    assert load_tensors(run / "checkpoints" / "last.ckpt")["epoch"] == 0  # what it had: the first epoch's
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]  # the failed write removed


@pytest.mark.slow
def test_eight_train_processes_started_together_get_eight_folders(tmp_path):
    """Eight real train.py processes started at the same moment, all writing under one runs folder with the
    default time-stamped names: eight distinct run folders, each with its own .hydra and run.json (its seed).
    (slow: eight interpreters' imports on two cores, about a minute)"""
    runs = tmp_path / "runs"
    env = {**os.environ, "CI": "true", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "train.py"), *TINY_MODEL, f"seed={100 + i}",
                               "data=csv", f"data.manifest={tmp_path / 'missing.csv'}",  # stops right after its folder
                               f"paths.log_dir={runs}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for i in range(8)]
    for p in procs:
        p.wait(timeout=600)
    folders = [p.parent for p in runs.rglob("run.json")]
    assert len(folders) == 8 and len(set(folders)) == 8
    seeds = sorted(json.loads((f / "run.json").read_text())["seed"] for f in folders)
    assert seeds == list(range(100, 108))
    for f in folders:
        seed = json.loads((f / "run.json").read_text())["seed"]
        assert f"seed={seed}" in (f / ".hydra" / "overrides.yaml").read_text()


@pytest.mark.slow
def test_two_evaluations_of_one_run_at_the_same_moment_never_overwrite(tiny_run):
    env = {**os.environ, "CI": "true", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    before = set((tiny_run / "evaluations").glob("*")) if (tiny_run / "evaluations").exists() else set()
    procs = [subprocess.Popen([sys.executable, str(ROOT / "evaluate.py"), f"run_dir={tiny_run}", f"seed={s}"],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for s in (1, 2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    new = sorted(set((tiny_run / "evaluations").glob("*")) - before)
    assert len(new) == 2
    assert {json.loads((d / "run.json").read_text())["command"].split("seed=")[-1].split()[0] for d in new} == {"1", "2"}


@pytest.mark.slow
def test_a_hundred_thousand_images_stream_under_a_small_memory_cap(tmp_path):
    """100,000 phantom PNGs (96 x 96) read with data.cache=false under a 1.7 GiB RSS cap: the process is killed
    the moment it exceeds it. Importing torch / Lightning / MONAI alone takes ~1.2 GiB here, so keeping the
    90,000 training images' pixels (0.77 GiB) would cross the cap; streaming holds only the records.
    (slow: writing and reading 100,000 files, a few minutes)"""
    from tests.conftest import run_script_capped

    proc, peak_mb = run_script_capped("experiments/scale.py", "stream", "--n", "100000", "--out",
                                      str(tmp_path / "stream"), max_rss_mb=1740, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["train_images_read"] > 85_000 and res["rss_after_imports_gib"] + res["cached_pixels_gib"] > 1.7
    assert peak_mb < 1740
