"""Resume refuses a config whose model/data/loss (or one-cycle length) differ from the saved one."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from medtrust.runs.resume import check_resume_config, prepare_train_argv
from medtrust.runs.rundir import RunDirError

SAVED = {"model": {"net": {"channels": [4, 8]}, "scheduler": {"_target_": "torch.optim.lr_scheduler.OneCycleLR"}},
         "data": {"image_size": [32, 32]}, "loss": {"_target_": "monai.losses.DiceLoss"},
         "trainer": {"max_epochs": 2}, "resume": {"enabled": True, "force": False}}


def cfg(**changes):
    c = OmegaConf.create(SAVED)
    for k, v in changes.items():
        OmegaConf.update(c, k, v)
    return c


def test_same_config_resumes_and_changes_are_refused_unless_forced(tmp_path):
    OmegaConf.save(OmegaConf.create(SAVED), tmp_path / "config.yaml")
    assert check_resume_config(cfg(), tmp_path) == []
    with pytest.raises(RunDirError, match=r"model.net.channels: saved \[4, 8\], now \[8, 16\]"):
        check_resume_config(cfg(**{"model.net.channels": [8, 16]}), tmp_path)
    with pytest.raises(RunDirError, match="OneCycleLR schedule cannot be lengthened"):
        check_resume_config(cfg(**{"trainer.max_epochs": 4}), tmp_path)
    forced = check_resume_config(cfg(**{"data.image_size": [64, 64], "resume.force": True}), tmp_path)
    assert forced and "data.image_size" in forced[0]


def test_argv_without_resume_is_untouched_and_run_dir_alone_is_refused(tmp_path):
    assert prepare_train_argv(["train.py", "loss=dice"]) == ["train.py", "loss=dice"]
    with pytest.raises(RunDirError, match="add resume=true"):
        prepare_train_argv(["train.py", f"run_dir={tmp_path}"])
    with pytest.raises(RunDirError, match="needs run_dir"):
        prepare_train_argv(["train.py", "resume=true"])


def test_a_ddp_child_keeps_the_command_line_rank_0_prepared(tmp_path, monkeypatch):
    argv = ["train.py", "resume.enabled=true", f"run_dir={tmp_path}", "hydra.output_subdir=null"]
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert prepare_train_argv(argv) == argv  # no second rewrite, no .hydra/resume_* of its own
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(RunDirError, match="not a medtrust run|not found"):
        prepare_train_argv(argv)


def test_sigterm_watch_records_the_signal_and_exits_outside_fit():
    import os
    import signal

    from medtrust.runs.resume import SigtermWatch

    before = signal.getsignal(signal.SIGTERM)
    with SigtermWatch() as watch:
        watch.fitting = True  # inside fit: only recorded (Lightning stops at the next batch)
        os.kill(os.getpid(), signal.SIGTERM)
        assert watch.received
        watch.fitting = False
        with pytest.raises(SystemExit) as exc:
            os.kill(os.getpid(), signal.SIGTERM)
        assert exc.value.code == 143
    assert signal.getsignal(signal.SIGTERM) is before
