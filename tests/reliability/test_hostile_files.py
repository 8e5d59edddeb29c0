"""Files received from someone else cannot run code: a pickle payload in every file the project loads (checkpoints,
anomaly statistics, evaluator weights, a generator's or VAE run's checkpoint, a MedMNIST npz, Lightning's resume
checkpoint) is refused with the file named, and the payload never runs; a truncated checkpoint is named too."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import run_script


class Payload:
    """Unpickling this runs ``touch <marker>``: what a hostile checkpoint would do with a real command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def hostile(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": Payload(marker)}, path)
    return path


def truncated(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.zeros(64)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def fake_run(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "run.json").write_text(json.dumps({"kind": "train"}))
    (root / ".hydra").mkdir(exist_ok=True)
    (root / ".hydra" / "config.yaml").write_text("task_name: x\n")
    return root


def _load_tensors(p: Path) -> None:
    from medtrust.utils.io import load_tensors

    load_tensors(p)


def _load_weights(p: Path) -> None:  # best.ckpt / last.ckpt: evaluate.py, explain.py, generate.py, train.py's final load
    from medtrust.runs.rundir import load_weights

    load_weights(torch.nn.Linear(2, 1), p)


def _init_from(p: Path) -> None:  # model.init_from=<checkpoint> of any task
    from medtrust.tasks.base import load_init_weights

    load_init_weights(torch.nn.Linear(2, 1), p)


def _generator_init_from(p: Path) -> None:  # a generator's model.init_from (EMA weights)
    from medtrust.tasks.generation import GenerationTask

    GenerationTask._init_from(None, str(p))


def _anomaly_stats(p: Path) -> None:
    from medtrust.anomaly.scoring import AnomalyStats

    AnomalyStats.load(p)


def _evaluator(p: Path) -> None:  # a generator run's evaluator/evaluator.pt
    from medtrust.evaluation.generation import EVALUATOR_DIR, load_evaluators

    run = p.parent.parent
    (run / EVALUATOR_DIR / "evaluator.json").write_text(json.dumps({"heads": {}, "width": 4}))
    load_evaluators(run)


def _vae_run(p: Path) -> None:  # model.vae_run=<stage-1 run>: its checkpoints/best.ckpt
    from medtrust.tasks.autoencoder import STATS_FILE, read_vae_run

    run = fake_run(p.parent.parent)
    (run / STATS_FILE).write_text("{}")
    read_vae_run(run)


LOADERS = {
    "load_tensors": (_load_tensors, "x.pt"),
    "best.ckpt": (_load_weights, "run/checkpoints/best.ckpt"),
    "init_from": (_init_from, "init.ckpt"),
    "generator_init_from": (_generator_init_from, "gen.ckpt"),
    "anomaly_stats.pt": (_anomaly_stats, "run/anomaly_stats.pt"),
    "evaluator.pt": (_evaluator, "run/evaluator/evaluator.pt"),
    "vae_run_best.ckpt": (_vae_run, "vae/checkpoints/best.ckpt"),
}


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_pickle_payload_is_refused_and_never_runs(name, tmp_path):
    load, rel = LOADERS[name]
    marker = tmp_path / "PWNED"
    path = hostile(tmp_path / rel, marker)
    with pytest.raises(ValueError) as err:
        load(path)
    assert str(path) in str(err.value) and "refused" in str(err.value), err.value
    assert not marker.exists(), "the payload ran"


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_truncated_file_is_named(name, tmp_path):
    load, rel = LOADERS[name]
    path = truncated(tmp_path / rel)
    with pytest.raises(ValueError) as err:
        load(path)
    assert str(path) in str(err.value) and "truncated or corrupt" in str(err.value), err.value


def test_npz_with_a_pickled_object_is_refused_and_never_runs(tmp_path):
    from medtrust.data.records import DataError
    from medtrust.data.sources.medmnist import MedMnistSource

    marker = tmp_path / "PWNED"
    arr = np.empty(2, dtype=object)
    arr[0], arr[1] = Payload(marker), Payload(marker)
    np.savez(tmp_path / "m.npz", train_images=arr, train_labels=np.array([[0], [1]]))
    with pytest.raises(DataError, match="cannot be read without pickle"):
        MedMnistSource(str(tmp_path / "m.npz")).records()
    assert not marker.exists()


def test_lightning_resume_loads_weights_only(tmp_path):
    """train.py resumes with ``trainer.fit(ckpt_path=..., weights_only=True)``: Lightning refuses the payload."""
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(2, 1)

        def training_step(self, batch, _):
            return self.w(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    marker = tmp_path / "PWNED"
    ckpt = hostile(tmp_path / "last.ckpt", marker)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 2)), batch_size=2)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|global"):
        trainer.fit(Tiny(), data, ckpt_path=str(ckpt), weights_only=True)
    assert not marker.exists()


@pytest.mark.integration
def test_a_run_folder_with_a_hostile_checkpoint_is_refused_by_evaluate(tiny_run, tmp_path):
    """End to end, in a subprocess (if the check broke, the payload must not run inside pytest)."""
    evil = tmp_path / "evil"
    shutil.copytree(tiny_run, evil, ignore=shutil.ignore_patterns("evaluations", "explanations"))
    marker = tmp_path / "PWNED"
    hostile(evil / "checkpoints" / "best.ckpt", marker)
    proc = run_script("evaluate.py", f"run_dir={evil}", f"hydra.run.dir={tmp_path / 'out'}", check=False)
    assert proc.returncode == 1 and str(evil / "checkpoints" / "best.ckpt") in proc.stderr, proc.stderr[-2000:]
    assert "refused" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()
