"""OmegaConf resolvers used by the configs (registered once on import)."""
from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def task_from_target(target: str) -> str:
    """``medtrust.tasks.segmentation.SegmentationTask`` -> ``segmentation`` (the run-folder name)."""
    parts = str(target).split(".")
    return parts[-2] if len(parts) >= 2 else str(target).lower()


_FRESH: dict[str, str] = {}


def fresh_dir(path: str) -> str:
    """``path`` if it does not exist yet, else ``path_2``, ``path_3``, …, created here with an exclusive
    ``mkdir``: of several runs started in the same second each gets its own folder before Hydra writes
    ``.hydra/`` into it (a check-then-use name let a second run overwrite the first run's ``.hydra``).
    One answer per argument and process (Hydra resolves the interpolation more than once)."""
    if os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("MEDTRUST_REUSE_RUN_DIR"):
        return path  # DDP workers re-enter the folder rank 0 created
    if path in _FRESH:
        return _FRESH[path]
    p, k = Path(path), 1
    p.parent.mkdir(parents=True, exist_ok=True)
    cand = p
    while True:
        try:
            cand.mkdir()
            break
        except FileExistsError:
            k += 1
            cand = p.with_name(f"{p.name}_{k}")
    _FRESH[path] = str(cand)
    return str(cand)


def eval_dir(run_dir: str | None, fallback: str) -> str:
    """Where evaluate.py writes: ``<run_dir>/evaluations`` for one run, else ``fallback``."""
    return f"{run_dir}/evaluations" if run_dir not in (None, "", "None") else fallback


def progress_bar_enabled() -> bool:
    """Progress bars on, except in CI (``CI`` set to a true value)."""
    return os.environ.get("CI", "").lower() not in ("1", "true", "yes")


def _hydra_runtime():
    from hydra.core.hydra_config import HydraConfig

    try:
        return HydraConfig.get()
    except ValueError:  # no Hydra context (library use)
        return None


def wandb_group(default: str) -> str:
    """W&B group of a run: the sweep folder (``<task>/<time>``) for every job of a multirun, so a
    sweep's jobs are compared together; ``default`` for a single run."""
    hc = _hydra_runtime()
    if hc is not None and str(hc.mode) == "RunMode.MULTIRUN":
        return "sweep-" + Path(str(hc.sweep.dir)).name
    return default


def run_name() -> str:
    """The run folder's name (``<time>`` or ``<sweep>/<job>``): the W&B run name."""
    hc = _hydra_runtime()
    if hc is None:
        return "run"
    out = Path(str(hc.runtime.output_dir))
    return f"{out.parent.name}-{out.name}" if str(hc.mode) == "RunMode.MULTIRUN" else out.name


def first(value: object) -> object:
    """The first element of a list (``[64, 64]`` -> 64), or the value itself."""
    return value[0] if isinstance(value, (list, tuple)) or hasattr(value, "__getitem__") and not isinstance(value, str) else value


def latent_size(image_size: object, block_out_channels: object) -> int:
    """Side of an autoencoder's latents: the image side over ``2 ** (levels - 1)``.

    Raises:
        ValueError: the image is not square or its side is not divisible by the downsampling.
    """
    size = [int(s) for s in image_size] if not isinstance(image_size, (int, str)) else [int(image_size)] * 2
    factor = 2 ** (len(list(block_out_channels)) - 1)
    if size[0] != size[1] or size[0] % factor:
        raise ValueError(f"data.image_size={size}: the generator needs square images whose side is divisible by "
                         f"the autoencoder's downsampling {factor} (model.vae.block_out_channels)")
    return size[0] // factor


def register_resolvers() -> None:
    pairs = {
        "project_root": (lambda: str(PROJECT_ROOT), False),
        "task_from_target": (task_from_target, False),
        "fresh_dir": (fresh_dir, True),
        "progress_bar": (progress_bar_enabled, False),
        "eval_dir": (eval_dir, False),
        "wandb_group": (wandb_group, False),
        "run_name": (run_name, False),
        "first": (first, False),
        "latent_size": (latent_size, False),
    }
    for name, (fn, cache) in pairs.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn, use_cache=cache)


register_resolvers()
