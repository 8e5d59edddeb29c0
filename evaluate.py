"""Evaluate trained runs: ``python evaluate.py run_dir=<run> [data.manifest=<csv>] [split=test]``
or compare runs: ``python evaluate.py "run_dirs=[runA,runB,runC]"``."""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

import medtrust.runs.resolvers  # noqa: F401
from medtrust.runs.cli import report_user_errors, take_verbose


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
@report_user_errors
def main(cfg: DictConfig) -> None:
    from medtrust.runs.evaluate import evaluate

    evaluate(cfg)


if __name__ == "__main__":
    sys.argv = take_verbose(sys.argv)
    from medtrust.runs.argv import prepare_argv
    from medtrust.runs.rundir import RunDirError

    try:
        sys.argv = prepare_argv(sys.argv)
    except RunDirError as err:
        sys.exit(f"evaluate.py: {err}")
    main()
