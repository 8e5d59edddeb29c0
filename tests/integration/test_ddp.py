"""trainer=ddp on 2 CPU processes (gloo) writes ONE run folder: rank 0 writes, rank 1 trains in it."""
from __future__ import annotations

import json

import pytest

from tests.conftest import TINY, run_script

pytestmark = pytest.mark.integration


def test_ddp_two_cpu_processes_write_one_run_folder(tmp_path):
    run_script("train.py", "trainer=ddp", "trainer.devices=2", *TINY, f"paths.log_dir={tmp_path}")
    runs = [p for p in (tmp_path / "segmentation").iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    run = runs[0]
    assert json.loads((run / "status.json").read_text())["status"] == "completed"
    assert (run / "metrics" / "test.json").is_file() and (run / "checkpoints" / "best.ckpt").is_file()
    # the second rank ran, in the same folder, and wrote only its log there
    assert (run / "train_ddp_process_1.log").is_file()
    assert len(list(run.glob("**/.hydra"))) == 1
