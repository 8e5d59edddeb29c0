"""Resuming an interrupted run in its own folder: ``python train.py run_dir=<run> resume=true``.

A run stopped by SIGTERM/SIGINT saves ``checkpoints/interrupted.ckpt`` (Lightning's
``OnExceptionCheckpoint``, written atomically) and records ``status: interrupted``. Resuming
recomposes the run's own overrides (``.hydra/overrides.yaml``) plus the new ones, keeps the original
``.hydra/`` (the resume's Hydra files go to ``.hydra/resume_<time>/``), refuses a config whose model
or data differ from the saved one unless ``resume.force=true``, and continues from the interrupted
(else the last) checkpoint with the same loggers' folders.
"""
from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from medtrust.runs.rundir import MARKER, RunDirError, check_run_dir, update_run_json

RESUME_KEYS = ("model", "data", "loss")  # what must not change when resuming


def _arg(argv: list[str], key: str) -> str | None:
    for a in argv[1:]:
        if a.startswith(f"{key}="):
            return a.split("=", 1)[1]
    return None


def prepare_train_argv(argv: list[str]) -> list[str]:
    """Rewrite ``train.py``'s command line for a resume (no-op otherwise).

    ``resume=true`` -> ``resume.enabled=true``; the run's saved overrides are put first (the new
    ones win); ``hydra.run.dir`` is the run folder; Hydra's files of the resume go to
    ``.hydra/resume_<time>`` so the run's original config is kept.

    Raises:
        RunDirError: ``run_dir`` without ``resume=true``, ``resume=true`` without ``run_dir``, a
            missing / non-medtrust folder, or a completed run.
    """
    if os.environ.get("LOCAL_RANK", "0") != "0":
        # a DDP rank started by Lightning with rank 0's (already rewritten) command line and its own
        # hydra.run.dir / hydra.output_subdir=null: rewriting again would give it a .hydra folder of its own
        return argv
    run_dir, resume = _arg(argv, "run_dir"), _arg(argv, "resume")
    enabled = str(resume).lower() in ("true", "1", "yes") or str(_arg(argv, "resume.enabled")).lower() == "true"
    if run_dir in (None, "null") and not enabled:
        return argv
    if any(a in ("-m", "--multirun") for a in argv[1:]):
        raise RunDirError("train.py: resume=true cannot be combined with -m (resume one run folder at a time)")
    if run_dir in (None, "null"):
        raise RunDirError("train.py: resume=true needs run_dir=<the interrupted run folder>")
    if not enabled:
        raise RunDirError(f"train.py: run_dir={run_dir} is only used to resume; add resume=true "
                          "(a new run always gets a new folder)")
    run = check_run_dir(run_dir)
    status = json.loads((run / "status.json").read_text()).get("status") if (run / "status.json").exists() else None
    if status == "completed":
        raise RunDirError(f"train.py: {run} completed already (status.json); nothing to resume")
    saved = [str(o) for o in OmegaConf.load(run / ".hydra" / "overrides.yaml")] \
        if (run / ".hydra" / "overrides.yaml").exists() else []
    new = [a for a in argv[1:] if not a.startswith(("run_dir=", "resume="))]
    new_keys = {re.split(r"[=]", a.lstrip("+~"), maxsplit=1)[0] for a in new}
    keep = [o for o in saved if re.split(r"=", o.lstrip("+~"), maxsplit=1)[0] not in new_keys
            and not o.startswith(("hydra.run.dir=", "hydra.output_subdir="))]
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    return [argv[0], *keep, *new, "resume.enabled=true", f"run_dir={run}", f"hydra.run.dir={run}",
            f"hydra.output_subdir=.hydra/resume_{stamp}"]


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def check_resume_config(cfg: DictConfig, run_dir: Path) -> list[str]:
    """Keys under model/data/loss whose resolved values differ from the run's saved ``config.yaml``.

    Raises:
        RunDirError: differences and not ``resume.force``.
    """
    saved = OmegaConf.load(run_dir / "config.yaml")
    diffs: list[str] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{prefix}.{k}")
        elif a != b:
            diffs.append(f"{prefix}: saved {a!r}, now {b!r}")

    for key in RESUME_KEYS:
        walk(_plain(saved.get(key)), _plain(cfg.get(key)), key)
    old_ep, new_ep = OmegaConf.select(saved, "trainer.max_epochs"), OmegaConf.select(cfg, "trainer.max_epochs")
    sched = str(OmegaConf.select(cfg, "model.scheduler._target_", default=""))
    if old_ep != new_ep and "OneCycleLR" in sched:
        # the one-cycle schedule's length is fixed at the start; the restored scheduler would step past its end
        diffs.append(f"trainer.max_epochs: saved {old_ep!r}, now {new_ep!r} (the OneCycleLR schedule cannot be "
                     "lengthened on resume)")
    if diffs and not cfg.resume.get("force", False):
        shown = "; ".join(diffs[:8]) + (f"; ... ({len(diffs)} in all)" if len(diffs) > 8 else "")
        raise RunDirError(f"resume refused: the config differs from the run's saved config in {shown} "
                          "(set resume.force=true to resume anyway)")
    return diffs


def resume_checkpoint(run_dir: Path) -> Path:
    """``checkpoints/interrupted.ckpt`` if the run was interrupted, else ``checkpoints/last.ckpt``.

    Raises:
        RunDirError: neither exists.
    """
    for name in ("interrupted.ckpt", "last.ckpt"):
        p = run_dir / "checkpoints" / name
        if p.is_file():
            return p
    raise RunDirError(f"{run_dir}/checkpoints has no interrupted.ckpt or last.ckpt to resume from")


def record_resume(run_dir: Path, ckpt: Path, diffs: list[str]) -> int:
    """Append this resume to ``run.json`` (``resumes``); returns how many resumes there were before."""
    resumes = json.loads((run_dir / MARKER).read_text()).get("resumes", [])
    resumes.append({"at": time.strftime("%Y-%m-%dT%H:%M:%S"), "checkpoint": str(ckpt), "forced_changes": diffs})
    update_run_json(run_dir, {"resumes": resumes})
    return len(resumes) - 1


class SigtermWatch:
    """Remembers that this process received SIGTERM, so a run stopped by a signal is recorded as
    interrupted even when the error that ends it is a peer's (under DDP a signal reaches every rank,
    and rank 0 may first see gloo's "Connection reset by peer" from a rank that is already gone).

    While Lightning fits, its own SIGTERM handler runs first (it stops at the next batch boundary)
    and calls this one too (Lightning keeps existing handlers). Outside fit this one is the only
    handler and ends the process like a plain SIGTERM would (``SystemExit(143)``).
    """

    def __init__(self) -> None:
        self.received = False
        self.fitting = False
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        self.received = True
        if not self.fitting:
            raise SystemExit(143)

    def __enter__(self) -> SigtermWatch:
        self.received, self.fitting = False, False  # one watch per job (multirun jobs share a process)
        self._previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        signal.signal(signal.SIGTERM, self._previous)
