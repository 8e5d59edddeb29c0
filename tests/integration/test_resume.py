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

from tests.conftest import ROOT, TINY, run_script

pytestmark = pytest.mark.integration
# enough steps per epoch that a signal lands inside an epoch; no early stopping so both runs do all epochs
RUN = [*TINY, "data.source.n_images=120", "data.batch_size=4", "trainer.max_epochs=4", "callbacks.early_stopping=null"]


def test_sigterm_then_resume_matches_an_uninterrupted_run(tmp_path):
    ref = tmp_path / "ref"
    run_script("train.py", *RUN, f"hydra.run.dir={ref}")
    run = tmp_path / "run"
    env = {**os.environ, "CI": "true", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *RUN, f"hydra.run.dir={run}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    metrics = run / "csv" / "metrics.csv"
    # wait until two epochs are done (a checkpoint exists), then stop it during the third
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and "val/seg/dice" in metrics.read_text().splitlines()[0] and \
                pd.read_csv(metrics)["val/seg/dice"].notna().sum() >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out[-2000:]
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "interrupted" and (run / "checkpoints" / "interrupted.ckpt").is_file(), (status, out[-2000:])
    assert not (run / "metrics" / "test.json").exists()

    run_script("train.py", f"run_dir={run}", "resume=true")
    assert json.loads((run / "status.json").read_text())["status"] == "completed"
    info = json.loads((run / "run.json").read_text())
    assert len(info["resumes"]) == 1 and info["resumes"][0]["checkpoint"].endswith("interrupted.ckpt")
    assert (run / ".hydra" / "config.yaml").is_file() and list((run / ".hydra").glob("resume_*/config.yaml"))
    assert (run / "csv" / "metrics.csv").is_file() and (run / "csv" / "resume1" / "metrics.csv").is_file()
    got = json.loads((run / "metrics" / "test.json").read_text())["seg"]
    want = json.loads((ref / "metrics" / "test.json").read_text())["seg"]
    # same epochs, optimiser and scheduler state; the interrupted epoch is replayed with other batches
    assert got["dice"] == pytest.approx(want["dice"], abs=0.05), (got["dice"], want["dice"])


def test_bad_resumes_are_refused_with_one_message(tiny_run, tmp_path):
    proc = run_script("train.py", f"run_dir={tmp_path / 'nope'}", "resume=true", check=False)
    assert proc.returncode != 0 and "folder not found" in proc.stderr
    proc = run_script("train.py", f"run_dir={tiny_run}", check=False)
    assert proc.returncode != 0 and "add resume=true" in proc.stderr
    proc = run_script("train.py", f"run_dir={tiny_run}", "resume=true", check=False)
    assert proc.returncode != 0 and "completed already" in proc.stderr
    # an interrupted run whose model would change: refused unless resume.force=true
    status = tiny_run / "status.json"
    saved = status.read_text()
    try:
        status.write_text(json.dumps({"status": "interrupted"}))
        proc = run_script("train.py", f"run_dir={tiny_run}", "resume=true", "model.net.channels=[8,16,32]", check=False)
        assert proc.returncode != 0 and "resume refused" in proc.stderr and "model.net.channels" in proc.stderr
    finally:
        status.write_text(saved)
