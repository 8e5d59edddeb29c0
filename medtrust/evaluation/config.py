"""The evaluation config of a task: ``conf/evaluation/<task>.yaml`` is the one source of its keys
and defaults (the model config selects it; no Python dict repeats it)."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError

from medtrust.runs.resolvers import PROJECT_ROOT

CONF_DIR = PROJECT_ROOT / "conf" / "evaluation"


def evaluation_file(name: str) -> Path:
    """``conf/evaluation/<name>.yaml`` (raises FileNotFoundError naming the choices)."""
    path = CONF_DIR / f"{name}.yaml"
    if not path.is_file():
        have = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no evaluation config {path}; choices: {have}")
    return path


def evaluation_config(name: str, given: Mapping[str, Any] | DictConfig | None = None) -> DictConfig:
    """The evaluation settings of a task.

    ``given`` is what Hydra composed (train.py / evaluate.py): used as it is, since it was composed
    from the task's file and checked there. Without it (library use) the task's file is read; a
    partial mapping is merged onto it, and a key the file does not have is refused.

    Args:
        name: the task's ``evaluation_config`` (``segmentation``, ``classification``, ...).
        given: a composed config, a partial override, or None.

    Raises:
        KeyError: a key of ``given`` that the task's evaluation file does not define.
    """
    if isinstance(given, DictConfig) and _looks_complete(name, given):
        return given
    base = OmegaConf.load(evaluation_file(name))
    if not given:
        return base  # type: ignore[return-value]
    OmegaConf.set_struct(base, True)
    try:
        return OmegaConf.merge(base, OmegaConf.create(dict(given) if not isinstance(given, DictConfig) else given))  # type: ignore[return-value]
    except ConfigKeyError as err:
        raise KeyError(f"evaluation: {err.full_key or err.key!s} is not a key of {evaluation_file(name)} "
                       f"(keys: {sorted(base)})") from err


def _looks_complete(name: str, cfg: DictConfig) -> bool:
    """A composed config carries every top-level key of the task's file (or the file is not in
    the project's tree, e.g. a task whose configs come from a Hydra search path)."""
    path = CONF_DIR / f"{name}.yaml"
    if not path.is_file():
        return True
    return set(OmegaConf.load(path)) <= set(cfg)


def plain(cfg: Any) -> dict[str, Any]:
    """A resolved plain dict of a config node (for JSON files)."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg or {})


def to_plain(value: Any) -> Any:
    """A config value as a plain Python value (a list in a DictConfig is a ListConfig)."""
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def fit_split(datamodule: Any, choice: str, key: str) -> str:
    """The split a post-fit step fits on (temperature, thresholds): ``auto`` takes the calibration
    split ``cal`` (carved from the training patients) when the data has one, else ``val``.

    Args:
        choice: ``auto``, ``val`` or ``cal``.
        key: the config key, for messages (e.g. ``evaluation.calibration_split``).

    Raises:
        ValueError: another choice, or a split the data does not have.
    """
    if choice == "auto":
        return "cal" if datamodule.has_split("cal") else "val"
    if choice not in ("val", "cal"):
        raise ValueError(f"{key} must be auto, val or cal, got {choice!r}")
    if not datamodule.has_split(choice):
        raise ValueError(f"{key}={choice} but the data has no {choice!r} split "
                         "(set data.splits.calibration_fraction > 0 to carve one from train)")
    return choice


def check_evaluation(cfg: Any) -> None:
    """Refuse evaluation settings that are wrong whatever the data, before anything is trained or read:
    ``conformal.alpha`` outside (0, 1) (None = off), ``ood.keep_in_distribution`` outside (0, 1).

    Raises:
        ValueError: naming the key and what was expected.
    """
    from omegaconf import OmegaConf

    from medtrust.metrics.conformal import check_alpha

    if cfg is None:
        return
    alpha = OmegaConf.select(cfg, "conformal.alpha", default=None) if OmegaConf.is_config(cfg) else None
    if alpha is not None:
        check_alpha(alpha, "evaluation.conformal.alpha")
    keep = OmegaConf.select(cfg, "ood.keep_in_distribution", default=None) if OmegaConf.is_config(cfg) else None
    if keep is not None:
        check_alpha(keep, "evaluation.ood.keep_in_distribution")
