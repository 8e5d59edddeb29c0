"""logger=wandb (offline): one W&B run per multirun job, grouped by the sweep, with images and tables."""
from __future__ import annotations

import json

import pytest

from tests.conftest import TINY, run_script

pytestmark = pytest.mark.integration


# what a user's environment holds: none of it may reach a run folder, a log, the W&B files or the report
SECRETS = {"WANDB_API_KEY": "medtrustfakewandbkey0123456789abcdef0123456789",
           "HF_TOKEN": "hf_medtrustFakeToken0123456789", "AWS_SECRET_ACCESS_KEY": "medtrust/FakeAwsSecret0123456789"}


def test_each_multirun_job_is_its_own_grouped_wandb_run_with_media(tmp_path):
    sweep = tmp_path / "wb"
    run_script("train.py", "-m", *TINY, "trainer.max_epochs=1", "logger=wandb", "loss=dice,tversky",
               f"hydra.sweep.dir={sweep}", env=SECRETS)
    files = [p for p in sweep.rglob("*") if p.is_file()]
    assert len(files) > 50 and any(p.name == "index.html" for p in files) and any(p.suffix == ".log" for p in files)
    leaked = [(str(p), k) for p in files for k, v in SECRETS.items() if v.encode() in p.read_bytes()]
    assert not leaked, f"secrets written to the run folder: {leaked}"
    ids = []
    for job in ("0", "1"):
        info = json.loads((sweep / job / "run.json").read_text())
        runs = list((sweep / job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1 and runs[0].name.endswith(info["wandb_id"])  # the job's own run, in its folder
        ids.append(info["wandb_id"])
        media = runs[0] / "files" / "media"
        assert list((media / "images").rglob("reliability*.png")) and list((media / "table").rglob("*.json"))
        assert list((media / "table").rglob("test_subgroups*.json")) and list((media / "table").rglob("test_per_image*.json"))
        assert "'group': 'sweep-wb'" in (sweep / job / "wandb" / "debug.log").read_text()
    assert ids[0] != ids[1]


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path):
    run = tmp_path / "run"
    run_script("train.py", *TINY, "trainer.max_epochs=1", "logger=wandb", f"hydra.run.dir={run}")
    wid = json.loads((run / "run.json").read_text())["wandb_id"]
    # pretend it was interrupted after its last checkpoint, then resume (from last.ckpt)
    (run / "status.json").write_text(json.dumps({"status": "interrupted"}))
    run_script("train.py", f"run_dir={run}", "resume=true")
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(wid) for p in offline)
    assert json.loads((run / "status.json").read_text())["status"] == "completed"
