"""Generate images from a trained generator run:
``python generate.py run_dir=<run> prompt="..." modality=chest_xray n=16 seed=0`` (or ``prompts=<csv>``),
``save_pretrained=<folder>`` to export a diffusers pipeline."""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

import medtrust.runs.resolvers  # noqa: F401
from medtrust.runs.cli import report_user_errors, take_verbose


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
@report_user_errors
def main(cfg: DictConfig) -> None:
    from medtrust.runs.generate import generate

    generate(cfg)


if __name__ == "__main__":
    sys.argv = take_verbose(sys.argv)
    from medtrust.runs.argv import prepare_argv
    from medtrust.runs.rundir import RunDirError

    try:
        sys.argv = prepare_argv(sys.argv, multi=False, groups=())
    except RunDirError as err:
        sys.exit(f"generate.py: {err}")
    main()
