"""A run stopped by SIGTERM mid-training saves a checkpoint and resumes in the same folder to the
metrics of an uninterrupted run; bad resumes are refused with one message."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from tests.conftest import ROOT, TINY, refused, run_script

pytestmark = pytest.mark.integration
# enough steps per epoch that a signal lands inside an epoch; no early stopping so both runs do all epochs
RUN = [*TINY, "data.source.n_images=120", "data.batch_size=4", "trainer.max_epochs=4", "callbacks.early_stopping=null"]


def _start_and_stop_during_epoch_3(run, args, group: bool = False) -> str:
    """Start train.py, wait until two epochs are logged, then SIGTERM it (its process group when
    ``group``: every DDP rank, like Ctrl-C in a terminal or a scheduler does); returns its output."""
    env = {**os.environ, "CI": "true", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, f"hydra.run.dir={run}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=group)
    deadline = time.time() + 300
    metrics = run / "csv" / "metrics.csv"
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and "val/seg/dice" in metrics.read_text().splitlines()[0] and \
                pd.read_csv(metrics)["val/seg/dice"].notna().sum() >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    time.sleep(0.5)
    if group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL) if group else proc.kill()
        raise AssertionError("the interrupted run hung instead of stopping") from None
    assert proc.returncode == 143, out[-2000:]
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "interrupted" and (run / "checkpoints" / "interrupted.ckpt").is_file(), (status, out[-2000:])
    assert not (run / "metrics" / "test.json").exists()
    return out


def _saved_step(run) -> int:
    """The global step in interrupted.ckpt (read before the resume, which may replace it)."""
    return int(torch.load(run / "checkpoints" / "interrupted.ckpt", map_location="cpu", weights_only=True)["global_step"])


def _check_resumed(run, ref, saved: int) -> None:
    assert json.loads((run / "status.json").read_text())["status"] == "completed"
    info = json.loads((run / "run.json").read_text())
    assert len(info["resumes"]) == 1 and info["resumes"][0]["checkpoint"].endswith("interrupted.ckpt")
    assert (run / ".hydra" / "config.yaml").is_file() and list((run / ".hydra").glob("resume_*/config.yaml"))
    assert (run / "csv" / "metrics.csv").is_file() and (run / "csv" / "resume1" / "metrics.csv").is_file()
    # a resume, not a restart: the resumed log continues at the global step the checkpoint saved
    # (a restart would log from step 0), and ends at the same final step as the uninterrupted run
    resumed = pd.read_csv(run / "csv" / "resume1" / "metrics.csv")
    steps = resumed.dropna(subset=["train/loss_step"])["step"]
    assert saved > 0 and int(steps.min()) == saved, (saved, steps.min())
    ref_steps = pd.read_csv(ref / "csv" / "metrics.csv").dropna(subset=["train/loss_step"])["step"]
    assert int(steps.max()) == int(ref_steps.max())
    got = json.loads((run / "metrics" / "test.json").read_text())["seg"]
    want = json.loads((ref / "metrics" / "test.json").read_text())["seg"]
    # same epochs, optimiser and scheduler state; the interrupted epoch is replayed with other batches
    assert got["dice"] == pytest.approx(want["dice"], abs=0.05), (got["dice"], want["dice"])


def test_sigterm_then_resume_matches_an_uninterrupted_run(tmp_path):
    ref = tmp_path / "ref"
    run_script("train.py", *RUN, f"hydra.run.dir={ref}")
    run = tmp_path / "run"
    _start_and_stop_during_epoch_3(run, RUN)
    saved = _saved_step(run)
    run_script("train.py", f"run_dir={run}", "resume=true")
    _check_resumed(run, ref, saved)


def test_ddp_run_stopped_on_every_rank_resumes_in_its_folder(tmp_path):
    """SIGTERM to both DDP ranks: no hang (Lightning's own handler deadlocks here), rank 0 alone writes
    interrupted.ckpt, and the resume runs both ranks from it in the same folder."""
    args = [*RUN, "trainer=ddp", "trainer.devices=2"]
    ref = tmp_path / "ref"
    run_script("train.py", *args, f"hydra.run.dir={ref}")
    run = tmp_path / "run"
    _start_and_stop_during_epoch_3(run, args, group=True)
    saved = _saved_step(run)
    proc = run_script("train.py", f"run_dir={run}", "resume=true")
    _check_resumed(run, ref, saved)
    # the second rank resumed from the same checkpoint (it would otherwise start at epoch 0 and hang rank 0)
    assert "rank 1: resuming from" in (run / "train_ddp_process_1.log").read_text(), proc.stderr[-2000:]
    assert len([p for p in run.parent.iterdir() if p.name.startswith("run")]) == 1
    assert len(list((run / ".hydra").glob("resume_*"))) == 1  # rank 1 writes no Hydra files of its own


def test_bad_resumes_are_refused_with_one_message(tiny_run, tmp_path):
    proc = refused("train.py", f"run_dir={tmp_path / 'nope'}", "resume=true")
    assert proc.returncode != 0 and "folder not found" in proc.stderr
    proc = refused("train.py", f"run_dir={tiny_run}")
    assert proc.returncode != 0 and "add resume=true" in proc.stderr
    proc = refused("train.py", f"run_dir={tiny_run}", "resume=true")
    assert proc.returncode != 0 and "completed already" in proc.stderr
    # an interrupted run whose model would change: refused unless resume.force=true
    status = tiny_run / "status.json"
    saved = status.read_text()
    try:
        status.write_text(json.dumps({"status": "interrupted"}))
        proc = refused("train.py", f"run_dir={tiny_run}", "resume=true", "model.net.channels=[8,16,32]")
        assert proc.returncode != 0 and "resume refused" in proc.stderr and "model.net.channels" in proc.stderr
    finally:
        status.write_text(saved)
