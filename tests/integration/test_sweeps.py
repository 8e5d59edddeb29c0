"""Optuna sweeps: the objective is what train.py returns, each trial has its own folder, and a
failing trial is recorded without ending the sweep."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from tests.conftest import TINY, run_script

pytestmark = pytest.mark.integration


def test_optuna_three_trials_with_one_failing(tmp_path):
    sweep = tmp_path / "sweep"
    # lr -1 makes the optimiser refuse to start: that trial fails, the others train
    proc = run_script("train.py", "-m", "hparams_search=seg_optuna", *TINY, "trainer.max_epochs=1",
                      'hydra.sweeper.params={model.optimizer.lr:"choice(0.003,-1.0)",loss:dice}',
                      "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.seed=2", f"hydra.sweep.dir={sweep}")
    summary = pd.read_csv(sweep / "summary.csv")
    assert len(summary) == 3
    assert set(summary["status"]) == {"completed", "failed"}, summary[["status"]]
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    values = [json.loads((sweep / str(j) / "status.json").read_text()).get("value") for j in summary["job"]]
    # the objective Optuna saw is what train.py returned (val/seg/dice of the completed trials)
    assert result["best_value"] == pytest.approx(max(v for v in values if v is not None))
    assert result["best_params"]["model.optimizer.lr"] == 0.003
    assert proc.returncode == 0


def test_basic_sweep_goes_on_past_a_failing_job(tmp_path):
    sweep = tmp_path / "grid"
    proc = run_script("train.py", "-m", *TINY, "trainer.max_epochs=1", "model.optimizer.lr=-1.0,0.003",
                      f"hydra.sweep.dir={sweep}")
    summary = pd.read_csv(sweep / "summary.csv")
    assert proc.returncode == 0 and list(summary["status"]) == ["failed", "completed"]
    assert "Invalid learning rate" in json.loads((sweep / "0" / "status.json").read_text())["error"]


def test_submitit_local_launcher_runs_jobs_in_their_own_folders(tmp_path):
    sweep = tmp_path / "sub"
    run_script("train.py", "-m", "hydra/launcher=submitit_local", *TINY, "trainer.max_epochs=1", "loss=dice,tversky",
               "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={sweep}")
    summary = pd.read_csv(sweep / "summary.csv")
    assert list(summary["status"]) == ["completed", "completed"]
    assert (sweep / ".submitit").is_dir()


def test_slurm_launcher_config_composes():
    from hydra import compose, initialize_config_dir

    from tests.conftest import ROOT

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher") and cfg.hydra.launcher.timeout_min == 240


def test_sweep_over_a_key_that_does_not_exist_is_one_clear_message(tmp_path):
    proc = run_script("train.py", "-m", *TINY, "model.optimizer.lrr=0.1,0.2", f"hydra.sweep.dir={tmp_path / 's'}",
                      check=False)
    assert proc.returncode != 0 and "lrr" in proc.stderr and "not in struct" in proc.stderr
    assert not list((tmp_path / "s").glob("*/status.json"))  # no job started


def test_optuna_study_persists_in_sqlite_and_a_second_sweep_continues_it(tmp_path):
    """storage=sqlite:///... keeps the study: a second sweep (its own folder) adds trials to it, and the
    study can be inspected with optuna afterwards (needs sqlalchemy<2 / alembic<1.20 with optuna 2.10)."""
    import optuna

    db = tmp_path / "optuna.db"
    common = ["hparams_search=seg_optuna", *TINY, "trainer.max_epochs=1", f"hydra.sweeper.storage=sqlite:///{db}",
              'hydra.sweeper.params={model.optimizer.lr:"choice(0.003,0.001)",loss:dice}']
    run_script("train.py", "-m", *common, "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={tmp_path / 'a'}")
    run_script("train.py", "-m", *common, "hydra.sweeper.n_trials=1", f"hydra.sweep.dir={tmp_path / 'b'}")
    study = optuna.load_study(study_name="seg_optuna", storage=f"sqlite:///{db}")
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(trials) == 3
    returned = [json.loads((tmp_path / s / str(j) / "status.json").read_text())["value"]
                for s, j in (("a", 0), ("a", 1), ("b", 0))]
    assert sorted(t.value for t in trials) == pytest.approx(sorted(returned))
    best = yaml.safe_load((tmp_path / "b" / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(returned))  # the second sweep reports the whole study's best
    assert (tmp_path / "a" / "summary.csv").exists() and (tmp_path / "b" / "summary.csv").exists()
