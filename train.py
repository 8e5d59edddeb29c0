"""Train a medtrust task: ``python train.py [group=choice ...] [key=value ...]`` (``-m`` for sweeps)."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

import medtrust.runs.resolvers  # noqa: F401  (registers ${project_root:}, ${fresh_dir:...}, ...)
from medtrust.runs.cli import report_user_errors, take_verbose


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@report_user_errors
def main(cfg: DictConfig) -> float | None:
    from medtrust.runs.train import train

    return train(cfg)


if __name__ == "__main__":
    import sys

    sys.argv = take_verbose(sys.argv)

    from medtrust.runs.resume import prepare_train_argv
    from medtrust.runs.rundir import RunDirError

    try:
        sys.argv = prepare_train_argv(sys.argv)
    except RunDirError as err:
        sys.exit(f"train.py: {err}" if not str(err).startswith("train.py") else str(err))
    main()
