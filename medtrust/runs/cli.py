"""How the entry scripts end on bad input: the message alone, not a traceback.

A refusal (bad data, a bad key or value, a missing file, a run folder that cannot be used) is the user's
to fix, and the message names what to fix. Hydra would print ~25 lines of traceback before it. Here,
in a single run, such an error prints ``<script>: <message>`` on stderr, goes to the run's log file,
and the script exits with status 1. ``HYDRA_FULL_ERROR=1`` or ``--verbose`` on the command line keeps
the full traceback. Anything else (a TypeError, a RuntimeError: most likely a bug) keeps Hydra's
traceback, and so does every job of a multirun, whose sweep must go on to its other jobs.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

VERBOSE_FLAGS = ("--verbose",)


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exceptions that are refusals with a message, not bugs."""
    from omegaconf.errors import ConfigKeyError, ValidationError

    from medtrust.utils.io import DiskFullError

    # DataError and RunDirError subclass ValueError
    return (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, ConfigKeyError, ValidationError,
            DiskFullError)


def take_verbose(argv: list[str]) -> list[str]:
    """``argv`` without ``--verbose``; when it was there, ``HYDRA_FULL_ERROR=1`` is set (full tracebacks)."""
    if any(a in VERBOSE_FLAGS for a in argv[1:]):
        os.environ["HYDRA_FULL_ERROR"] = "1"
    return [argv[0], *[a for a in argv[1:] if a not in VERBOSE_FLAGS]]


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:  # no Hydra context (called directly)
        return False


def _to_log_files(message: str) -> None:
    """``message`` as an ERROR line in the run's log files (the root logger's file handlers) only:
    the console gets it once, on stderr."""
    record = logging.LogRecord("medtrust", logging.ERROR, __file__, 0, message, None, None)
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(record)


def _kind(value: Any) -> str | None:
    """The kind a config value must keep when overridden: number, bool, list, dict; None = anything."""
    from omegaconf import DictConfig, ListConfig

    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, (list, tuple, ListConfig)):
        return "list"
    if isinstance(value, (dict, DictConfig)):
        return "dict"
    return None  # strings ("auto" may become a number), None (optional): anything goes


def user_error(err: BaseException) -> tuple[BaseException, str] | None:
    """``(the refusal, where)`` when ``err`` is a user error, also when Hydra's ``instantiate`` wrapped it
    (``where`` then names the config target whose constructor refused); None for anything else."""
    import re

    from hydra.errors import InstantiationException

    types = user_error_types()
    if isinstance(err, types):
        return err, ""
    if isinstance(err, InstantiationException) and isinstance(err.__cause__, types):
        target = re.search(r"target '([^']+)'", str(err))
        return err.__cause__, f" (building {target.group(1)})" if target else ""
    return None


def check_override_types() -> None:
    """Refuse a command-line value whose kind differs from the config tree's value for that key
    (``trainer.max_epochs=abc`` where the tree holds a number), before any data is read. The tree's
    value is composed with the command's group choices (``experiment=...``, ``model=...``) but none
    of its values. A number may replace a number (int or float), a string default accepts anything,
    ``null`` is always allowed; keys the tree does not have, ``+key=`` additions and ``hydra.*`` are
    left to Hydra.

    Raises:
        ValueError: naming the key, the value given and what the tree holds.
    """
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    hc = HydraConfig.get()
    conf_dir = Path(__file__).resolve().parents[2] / "conf"
    parsed = OverridesParser.create().parse_overrides(list(hc.overrides.task))
    groups = [o.input_line for o in parsed if (conf_dir / o.key_or_group.split("@")[0]).is_dir()
              and not o.is_delete()]
    values = [o for o in parsed if not o.is_add() and not o.is_delete() and not o.is_sweep_override()
              and not o.key_or_group.startswith("hydra") and not (conf_dir / o.key_or_group.split("@")[0]).is_dir()]
    if not values:
        return
    try:
        tree = compose(config_name=str(hc.job.config_name), overrides=groups)
    except Exception:  # noqa: BLE001 - the check is an extra: when the tree cannot be composed, Hydra's own checks stand
        return
    for o in values:
        given = o.value()
        if given is None or (isinstance(given, str) and "${" in given):
            continue
        try:
            default = OmegaConf.select(tree, o.key_or_group, default=None, throw_on_resolution_failure=False)
        except Exception:  # noqa: BLE001 - an interpolation that needs the running job: not checked
            continue
        want = _kind(default)
        if want is None or want == _kind(given):
            continue
        shown = OmegaConf.to_container(default) if OmegaConf.is_config(default) else default
        raise ValueError(f"{o.key_or_group}={o.get_value_element_as_str()}: expected a {want} (the config holds "
                         f"{shown!r}), got {type(given).__name__} {given!r}")


def report_user_errors(task_function: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a Hydra task function (under ``@hydra.main``) so a user error ends with its message alone."""

    @functools.wraps(task_function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            check_override_types()
            return task_function(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - only user errors are caught; the rest is re-raised
            found = user_error(exc)
            if found is None or os.environ.get("HYDRA_FULL_ERROR") == "1" or _multirun():
                raise
            err, where = found
            script = Path(sys.argv[0]).name or "medtrust"
            message = f"{script}: {type(err).__name__}{where}: {err}"
            _to_log_files(message)
            print(f"{message}\n(--verbose or HYDRA_FULL_ERROR=1 shows the traceback)", file=sys.stderr)
            sys.exit(1)

    return wrapper
