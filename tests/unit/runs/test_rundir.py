"""Run folders are claimed once and recognised; results are never overwritten."""
from __future__ import annotations

from pathlib import Path

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


def test_fresh_dir_creates_its_folder_and_never_reuses_one(tmp_path, monkeypatch):
    from medtrust.runs import resolvers

    monkeypatch.setattr(resolvers, "_FRESH", {})
    base = tmp_path / "2026-01-01_00-00-00"
    assert fresh_dir(str(base)) == str(base) and base.is_dir()        # claimed at once, before Hydra writes
    assert fresh_dir(str(base)) == str(base)                           # one answer per process
    resolvers._FRESH.clear()                                           # another process
    assert fresh_dir(str(base)) == str(base) + "_2"


def _claim(path, barrier, out):
    barrier.wait()                       # all eight call at the same moment
    out.put(fresh_dir(path))


def test_eight_runs_started_at_the_same_moment_get_eight_folders(tmp_path, monkeypatch):
    import multiprocessing as mp

    from medtrust.runs import resolvers

    monkeypatch.setattr(resolvers, "_FRESH", {})
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(8), ctx.Queue()
    procs = [ctx.Process(target=_claim, args=(str(tmp_path / "same_second"), barrier, out)) for _ in range(8)]
    for pr in procs:
        pr.start()
    got = [out.get(timeout=60) for _ in procs]
    for pr in procs:
        pr.join(timeout=60)
    assert len(set(got)) == 8 and all(Path(g).is_dir() for g in got)


def test_task_name_from_target():
    assert task_from_target("medtrust.tasks.segmentation.SegmentationTask") == "segmentation"
