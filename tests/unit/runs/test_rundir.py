"""Run folders are claimed once and recognised; results are never overwritten."""
from __future__ import annotations

import pytest

from medtrust.runs.resolvers import fresh_dir, task_from_target
from medtrust.runs.rundir import RunDirError, check_run_dir, claim_run_dir, find_checkpoint


def test_claim_once(tmp_path):
    claim_run_dir(tmp_path / "r")
    with pytest.raises(RunDirError, match="already holds a run"):
        claim_run_dir(tmp_path / "r")


def test_check_run_dir_messages(tmp_path):
    with pytest.raises(RunDirError, match="folder not found"):
        check_run_dir(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(RunDirError, match="not a medtrust run folder"):
        check_run_dir(tmp_path / "plain")
    run = tmp_path / "run"
    claim_run_dir(run)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("a: 1\n")
    assert check_run_dir(run) == run
    with pytest.raises(RunDirError, match="checkpoint not found"):
        find_checkpoint(run, "best")


def test_fresh_dir_never_reuses_an_existing_folder(tmp_path):
    base = tmp_path / "2026-01-01_00-00-00"
    assert fresh_dir(str(base)) == str(base)
    base.mkdir()
    assert fresh_dir(str(base)) == str(base) + "_2"


def test_task_name_from_target():
    assert task_from_target("medtrust.tasks.segmentation.SegmentationTask") == "segmentation"
