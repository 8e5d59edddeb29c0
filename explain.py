"""Explain a trained run: ``python explain.py run_dir=<run> [xai=<suite>] [split=test] [n_images=6]``
(the xai suite defaults to the one named after the run's task, e.g. ``segmentation``)."""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

import medtrust.runs.resolvers  # noqa: F401
from medtrust.runs.cli import report_user_errors, take_verbose


@hydra.main(version_base="1.3", config_path="conf", config_name="explain")
@report_user_errors
def main(cfg: DictConfig) -> None:
    from medtrust.runs.explain import explain

    explain(cfg)


if __name__ == "__main__":
    sys.argv = take_verbose(sys.argv)
    from medtrust.runs.argv import prepare_argv
    from medtrust.runs.rundir import RunDirError

    try:
        sys.argv = prepare_argv(sys.argv, multi=False, choose_xai=True, groups=("data",))
    except RunDirError as err:
        sys.exit(f"explain.py: {err}")
    main()
