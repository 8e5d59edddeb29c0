"""Command lines of evaluate.py and explain.py, checked and completed before Hydra composes (and
creates any folder): the run folders must exist, and the run's own group choices are selected."""
from __future__ import annotations

import re
from pathlib import Path

from medtrust.runs.resolvers import PROJECT_ROOT
from medtrust.runs.rundir import RunDirError, check_run_dir, load_run_choices, load_run_config


def _arg_value(argv: list[str], key: str) -> str | None:
    for a in argv[1:]:
        if a.startswith(f"{key}="):
            return a.split("=", 1)[1]
    return None


def _parse_list(text: str) -> list[str]:
    return [t.strip().strip("'\"") for t in text.strip().strip("[]").split(",") if t.strip()]


def _search_dirs(argv: list[str]) -> list[Path]:
    """Config folders given on the command line with ``hydra.searchpath=[file://...]``."""
    sp = _arg_value(argv, "hydra.searchpath")
    return [Path(p.removeprefix("file://")) for p in _parse_list(sp)] if sp else []


def prepare_argv(argv: list[str], multi: bool = True, choose_xai: bool = False,
                 groups: tuple[str, ...] = ("data", "evaluation")) -> list[str]:
    """Check ``run_dir``/``run_dirs`` before Hydra creates any folder, and select the run's own
    choices of ``groups`` (and, for explain.py, the run's own ``xai`` suite, or when it chose none the one
    named after its task, looked up in ``conf/xai/`` and the command's ``hydra.searchpath``) unless the
    command line chooses them.

    Raises:
        RunDirError: a run folder is missing or is not a medtrust run.
    """
    run_dir, run_dirs = _arg_value(argv, "run_dir"), _arg_value(argv, "run_dirs")
    ens = _arg_value(argv, "ensemble_runs")
    runs = [run_dir] if run_dir not in (None, "null") else []
    for many in (run_dirs, ens):
        if many not in (None, "null"):
            runs += _parse_list(str(many))
    if any(a.startswith(("-h", "--help", "--cfg", "--info")) for a in argv[1:]):
        return argv
    if multi and not runs and any(re.match(r"^audit=", a) for a in argv[1:]):
        return argv  # an audit (evaluate.py audit=<name>) names its generator and classifier runs in its config
    if not runs:
        hint = ' (or "run_dirs=[runA,runB]" to compare runs)' if multi else ""
        raise RunDirError(f"give run_dir=<run folder>{hint}")
    for r in runs:
        check_run_dir(r, "run_dir" if r == run_dir else "run_dirs")
    choices = load_run_choices(runs[0])
    for group in groups:
        if choices.get(group) and not any(re.match(rf"^{group}=", a) for a in argv[1:]):
            argv = [*argv, f"{group}={choices[group]}"]
    if choose_xai and not any(re.match(r"^xai=", a) for a in argv[1:]):
        # the run's own suite when it chose one (e.g. experiment=safegen_detector: xai=artifact_classifier),
        # else the one named after its task
        own = choices.get("xai")
        name = own if own and own != "none" else load_run_config(runs[0], check=False).get("task_name")
        folders = [PROJECT_ROOT / "conf", *_search_dirs(argv)]
        if name and any((f / "xai" / f"{name}.yaml").is_file() for f in folders):
            argv = [*argv, f"xai={name}"]
    return argv
