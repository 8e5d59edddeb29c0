"""Building a task, its data and its evaluation settings from configs: for a new run (train.py) and
from a run folder (evaluate.py, explain.py). The one module the entry points share, so none of
them imports another."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from medtrust.runs.rundir import RunDirError, find_checkpoint, load_run_choices, load_run_config, load_weights
from medtrust.tasks.base import RunModel, check_task
from medtrust.utils.io import read_json

# Preprocessing the model was trained with; kept from the run when the data group is switched.
PREPROCESSING_KEYS = ("image_size", "channels", "normalize", "require_mask", "augment", "num_classes")
# What runs must share to be compared or ensembled (training augmentation may differ).
COMPARABLE_KEYS = ("image_size", "channels", "normalize", "num_classes")


def setup_runtime(cfg: DictConfig) -> None:
    """Seed everything and set torch threads (same config + seed -> same metrics on one machine).

    Lightning's own console handlers are removed so its messages reach Hydra's root handlers
    (console and the run's log file) once instead of twice.
    """
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            lg.removeHandler(h)
        lg.propagate = True
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))


def instantiate_list(node: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a dict-of-configs node that has a ``_target_`` (None/empty -> [])."""
    if not node:
        return []
    return [instantiate(v) for v in node.values() if isinstance(v, DictConfig) and "_target_" in v]


def build_task(cfg: DictConfig, **overrides: Any) -> L.LightningModule:
    """Instantiate the task (``cfg.model``) with its loss (``cfg.loss``) and check it implements the
    task contract (:class:`medtrust.tasks.base.Task`).

    ``_convert_="all"`` hands plain lists/dicts to constructors, so saved hyperparameters hold no
    OmegaConf objects and checkpoints load with ``weights_only=True``.
    """
    loss = instantiate(cfg.loss, _convert_="all") if cfg.get("loss") else None
    task = instantiate(cfg.model, loss=loss, _convert_="all", **overrides)
    check_task(task)
    return task


def rebuild_task(run_cfg: DictConfig, ckpt: Path, threshold: float | None = None,
                 tta: list[str] | None = None) -> torch.nn.Module:
    """Instantiate the run's task from its config and load the checkpoint (``weights_only=True``);
    ``threshold``/``tta`` override the run's values when given. The task class's ``rebuild_overrides``
    (default ``{"init_from": None}``) are constructor arguments for a model whose weights all come from
    the checkpoint (nothing is initialised from elsewhere)."""
    extra = {"tta": list(tta)} if tta is not None else {}
    cls = get_class(str(run_cfg.model._target_))
    task = build_task(run_cfg, **{**getattr(cls, "rebuild_overrides", {"init_from": None}), **extra})
    load_weights(task, ckpt)
    if threshold is not None:
        task.threshold = float(threshold)
    return task.eval()


def task_class(run_dir: str | Path) -> type:
    """The task class of a run folder (its ``model._target_``, checked by :func:`load_run_config`)."""
    target = load_run_config(run_dir).model.get("_target_")
    try:
        cls = get_class(str(target))
    except Exception as err:
        raise RunDirError(f"{run_dir}: model._target_ {target!r} is not importable ({err})") from err
    check_task(cls)
    return cls


def _override_keys() -> list[str]:
    return [o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task]


def data_overridden(run_dir: str | Path) -> bool:
    """Whether this command evaluates on other data than the run's: a ``data.<key>=...`` override, or
    a ``data=<choice>`` other than the run's own (evaluate.py adds the run's own choice itself)."""
    keys = _override_keys()
    chosen = HydraConfig.get().runtime.choices.get("data")
    return any(k.startswith("data.") for k in keys) or ("data" in keys and chosen != load_run_choices(run_dir).get("data"))


def data_config_for(run_dir: str | Path, cfg: DictConfig) -> DictConfig:
    """The run's config with this command's ``data`` changes applied.

    ``data.<key>=...`` overrides change only those keys (so ``data.manifest=<other CSV>`` keeps the
    run's image size, normalisation and split settings); ``data=<choice>`` switches source but
    keeps the run's preprocessing (:data:`PREPROCESSING_KEYS`). ``split=all`` evaluates every row
    (no split fractions, no calibration split carved out).
    """
    run_cfg = load_run_config(run_dir)
    # the network is the one that was trained: its data.* interpolations (channels, image size, classes) are
    # resolved against the run's own data before this command's changes, so that data.channels=3 meets the
    # task's input check ("trained on 1 channel") instead of a 3-channel network that cannot load the weights
    run_cfg.model = OmegaConf.create(OmegaConf.to_container(run_cfg.model, resolve=True))
    keys = _override_keys()
    run_choice = load_run_choices(run_dir).get("data")
    chosen = HydraConfig.get().runtime.choices.get("data")
    if "data" in keys and chosen != run_choice:
        new = OmegaConf.create(OmegaConf.to_container(cfg.data, resolve=False))
        for k in PREPROCESSING_KEYS:
            if k in run_cfg.data:
                new[k] = run_cfg.data[k]
        run_cfg.data = new
    OmegaConf.set_struct(run_cfg, True)
    for key in keys:
        if key.startswith("data.") and not key.startswith("data.augment"):
            try:
                OmegaConf.update(run_cfg, key, OmegaConf.select(cfg, key), merge=False)
            except Exception as err:  # omegaconf raises several types for unknown keys
                raise KeyError(f"{key}: not a key of the run's data config ({err})") from err
    OmegaConf.set_struct(run_cfg, False)
    run_cfg.paths = cfg.paths
    if cfg.get("split") == "all":
        run_cfg.data.splits.use_source = False
        run_cfg.data.splits.fractions = {"train": 0.0, "val": 0.0, "test": 1.0}
        run_cfg.data.splits.calibration_fraction = 0.0
    return run_cfg


def evaluation_config_for(run_cfg: DictConfig, cfg: DictConfig, run_dir: str | Path | None = None) -> DictConfig:
    """The run's own evaluation settings with this command's ``evaluation.<key>=...`` applied; a
    command that chooses ``evaluation=<file>`` other than the run's own uses that file instead.

    evaluate.py adds ``evaluation=<the run's choice>`` to every command line (``prepare_argv``), so
    that choice alone does not mean the user asked for the file's defaults: before this check, every
    evaluation silently dropped the run's own settings (e.g. an experiment's ``evaluation.sampling``).
    Without ``run_dir`` (an ensemble or a comparison of several runs) no one run's settings are
    privileged: the chosen file with the command's ``evaluation.<key>=...``.
    """
    keys = _override_keys()
    own = load_run_choices(run_dir).get("evaluation") if run_dir is not None else None
    chosen = HydraConfig.get().runtime.choices.get("evaluation")
    user_file = "evaluation" in keys and (own is None or chosen != own)
    if user_file or run_cfg.get("evaluation") is None:
        return cfg.evaluation
    ev = OmegaConf.create(OmegaConf.to_container(run_cfg.evaluation, resolve=False))
    for key in keys:
        if key.startswith("evaluation."):
            OmegaConf.update(ev, key.split(".", 1)[1], OmegaConf.select(cfg, key), merge=False)
    return ev


def same_preprocessing(runs: list[Path], base: DictConfig) -> None:
    """Raise unless every run was trained with the preprocessing of ``base.data``."""
    for r in runs:
        other = load_run_config(r).data
        for k in COMPARABLE_KEYS:
            a = OmegaConf.to_container(OmegaConf.create({"v": OmegaConf.select(base.data, k)}), resolve=True)
            b = OmegaConf.to_container(OmegaConf.create({"v": OmegaConf.select(other, k)}), resolve=True)
            if a != b:
                raise RunDirError(f"runs differ in data.{k}: {runs[0]} has {a['v']}, {r} has {b['v']}; "
                                  "only runs trained with the same preprocessing can be compared or ensembled")


def split_digest(run_dir: Path) -> str | None:
    """The sha256 of the split a run was trained with (``splits/splits.json``)."""
    p = Path(run_dir) / "splits" / "splits.json"
    return read_json(p).get("sha256") if p.is_file() else None


def same_split(runs: list[Path], what: str) -> None:
    """Refuse runs trained on different splits of the data they are evaluated on together: one
    run's training patients would be in another's validation, calibration or test images.

    Raises:
        RunDirError: naming the runs and their split digests.
    """
    digests = {str(r): split_digest(r) for r in runs}
    if len(set(digests.values())) > 1:
        shown = ", ".join(f"{r}: {(d or 'none')[:12]}" for r, d in digests.items())
        raise RunDirError(f"{what}: the runs were trained on different splits of this data (splits/splits.json "
                          f"sha256 {shown}), so one run's training patients would be scored as another's "
                          "held-out images. Train them with the same data.splits (the split seed is "
                          "data.splits.seed, independent of the training seed), or evaluate them on other "
                          "data (data.<key>=...).")


def run_label(run_dir: Path, taken: set[str]) -> str:
    """A short unique label of a run: its experiment (or model) and loss choices."""
    ch = load_run_choices(run_dir)
    label = "/".join(x for x in (ch.get("experiment") or ch.get("model", "model"), ch.get("loss")) if x)
    if label in taken:
        label = f"{label} ({run_dir.name})"
    taken.add(label)
    return label


def load_run_models(runs: list[Path], base: DictConfig, cfg: DictConfig) -> list[RunModel]:
    """Each run rebuilt on the data config ``base`` with its checkpoint and what it fitted."""
    out, taken = [], set()
    for r in runs:
        run_cfg = load_run_config(r)
        run_cfg.data = base.data
        task = rebuild_task(run_cfg, find_checkpoint(r, str(cfg.checkpoint)), cfg.get("threshold"), cfg.get("tta"))
        out.append(RunModel(r, run_label(r, taken), task, type(task).load_post_fit(r)))
    return out
