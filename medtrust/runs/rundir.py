"""Run folders: claiming a fresh one, recognising one, and reloading its config and weights."""
from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from medtrust.utils.io import load_tensors

MARKER = "run.json"


class RunDirError(ValueError):
    """A run folder is missing, is not a medtrust run, or already holds a run."""


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parents[2])
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def claim_run_dir(run_dir: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Mark ``run_dir`` as this run's folder, atomically; refuse a folder that already holds a run.

    Raises:
        RunDirError: ``run_dir/run.json`` exists (another run's results would be overwritten).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "created": datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
        "git_commit": _git_commit(), "host": socket.gethostname(), "python": platform.python_version(),
        "torch": torch.__version__, "pid": os.getpid(), **(info or {}),
    }
    try:
        fd = os.open(run_dir / MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError as err:
        raise RunDirError(f"{run_dir} already holds a run ({MARKER} exists); a new run never writes into an "
                          "existing run folder - choose another hydra.run.dir") from err
    with os.fdopen(fd, "w") as fh:
        json.dump(payload, fh, indent=2)
    return run_dir


def update_run_json(run_dir: str | Path, fields: dict[str, Any]) -> None:
    """Add ``fields`` to the run's ``run.json`` (atomic replace)."""
    marker = Path(run_dir) / MARKER
    info = json.loads(marker.read_text())
    info.update(fields)
    tmp = marker.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(marker)


def check_run_dir(run_dir: str | Path, key: str = "run_dir") -> Path:
    """Return ``run_dir`` as a Path if it is a medtrust run folder.

    Raises:
        RunDirError: it does not exist or lacks ``run.json`` / ``.hydra/config.yaml``.
    """
    p = Path(str(run_dir)).expanduser()
    if not p.is_dir():
        raise RunDirError(f"{key}={run_dir}: folder not found")
    missing = [m for m in (MARKER, ".hydra/config.yaml") if not (p / m).exists()]
    if missing:
        raise RunDirError(f"{key}={run_dir}: not a medtrust run folder (missing {', '.join(missing)})")
    return p


_EXTRA_TARGETS: tuple[str, ...] = ()


def allow_targets(targets: list[str] | tuple[str, ...] | None) -> None:
    """Targets this command allows beyond the trusted config trees (``security.allow_targets``)."""
    global _EXTRA_TARGETS
    _EXTRA_TARGETS = tuple(str(t) for t in (targets or ()))


def command_policy() -> Any:
    """What a run folder's config may instantiate in this command: the project's ``conf/``, the
    config trees on this command's ``hydra.searchpath`` and ``security.allow_targets`` (never what
    the run folder itself lists)."""
    from hydra.core.hydra_config import HydraConfig

    from medtrust.runs.security import default_policy

    try:
        searchpath = [str(p) for p in (HydraConfig.get().searchpath or [])]
    except ValueError:  # no Hydra context (library use): the project's tree only
        searchpath = []
    return default_policy(searchpath, _EXTRA_TARGETS)


def load_run_config(run_dir: str | Path, check: bool = True) -> DictConfig:
    """The run's composed config (``.hydra/config.yaml``, interpolations kept).

    Every ``_target_`` in it is checked against :func:`command_policy` first, so a run folder
    received from someone else cannot make evaluate.py or explain.py import and call arbitrary code
    (``check=False`` only for reading plain values before Hydra starts; nothing is instantiated).

    Raises:
        medtrust.runs.security.UnsafeTargetError: a target outside the policy (named with its key).
    """
    path = check_run_dir(run_dir) / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(path)
    if check:
        from medtrust.runs.security import check_targets

        check_targets(cfg, str(path), command_policy())
    return cfg  # type: ignore[return-value]


def load_run_choices(run_dir: str | Path) -> dict[str, str]:
    """The config-group choices of a run (``data``, ``model``, ``loss``, …) from ``.hydra/hydra.yaml``."""
    path = check_run_dir(run_dir) / ".hydra" / "hydra.yaml"
    if not path.exists():
        return {}
    hy = OmegaConf.load(path)
    choices = OmegaConf.select(hy, "hydra.runtime.choices") or {}
    return {str(k): str(v) for k, v in OmegaConf.to_container(choices).items() if v is not None}


def find_checkpoint(run_dir: str | Path, which: str = "best") -> Path:
    """``best``/``last`` checkpoint of a run, or an explicit path.

    Raises:
        RunDirError: the checkpoint is missing.
    """
    if which in ("best", "last"):
        p = check_run_dir(run_dir) / "checkpoints" / f"{which}.ckpt"
    else:
        p = Path(which).expanduser()
    if not p.is_file():
        raise RunDirError(f"checkpoint not found: {p} (checkpoint=best|last|<path>)")
    return p


def load_weights(module: torch.nn.Module, ckpt_path: str | Path) -> None:
    """Load a checkpoint's ``state_dict`` into ``module`` strictly, with ``weights_only=True``."""
    ckpt = load_tensors(ckpt_path, "checkpoint")
    module.load_state_dict(ckpt["state_dict"] if "state_dict" in ckpt else ckpt, strict=True)
