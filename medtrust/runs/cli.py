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

    # DataError and RunDirError subclass ValueError
    return ValueError, FileNotFoundError, NotADirectoryError, PermissionError, ConfigKeyError, ValidationError


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


def report_user_errors(task_function: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a Hydra task function (under ``@hydra.main``) so a user error ends with its message alone."""

    @functools.wraps(task_function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return task_function(*args, **kwargs)
        except user_error_types() as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1" or _multirun():
                raise
            script = Path(sys.argv[0]).name or "medtrust"
            message = f"{script}: {type(err).__name__}: {err}"
            _to_log_files(message)
            print(f"{message}\n(--verbose or HYDRA_FULL_ERROR=1 shows the traceback)", file=sys.stderr)
            sys.exit(1)

    return wrapper
