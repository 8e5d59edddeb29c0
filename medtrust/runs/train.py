"""What ``train.py`` does: build everything from the config, fit, evaluate the best checkpoint on
val and test, write the run folder and its report."""
from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from medtrust.callbacks.checkpoint_io import AtomicCheckpointIO
from medtrust.callbacks.explanations import explanation_callbacks, selected_checkpoint
from medtrust.report.figures import plot_curves
from medtrust.evaluation.config import check_evaluation
from medtrust.report.html import build_run_report
from medtrust.runs.builders import build_task, instantiate_list, setup_runtime
from medtrust.runs.resume import SigtermWatch, check_resume_config, record_resume, resume_checkpoint
from medtrust.runs.rundir import RunDirError, claim_run_dir, command_policy, load_weights, update_run_json
from medtrust.runs.security import check_targets
from medtrust.tasks.base import EvalResult
from medtrust.utils.io import atomic_write_bytes, write_json
from medtrust.utils.logging import get_logger

log = get_logger(__name__)


def training_curves(run_dir: Path, monitor: str | None = None) -> Path | None:
    """Plot epoch-level curves from the CSV logger, if it ran: the losses, the monitored metric,
    its training counterpart and every logged calibration error."""
    csvs = sorted(run_dir.glob("csv/**/metrics.csv"), key=lambda p: p.stat().st_mtime)  # + resumed parts
    if not csvs:
        return None
    df = pd.concat([pd.read_csv(c) for c in csvs], ignore_index=True)
    if "epoch" not in df:
        return None
    series = {}
    wanted = ["train/loss_epoch", "val/loss"]
    if monitor:
        wanted += [monitor, monitor.replace("val/", "train/", 1)]
    wanted += sorted(c for c in df.columns if c.startswith("val/cal/ece"))
    for col in dict.fromkeys(wanted):
        if col in df:
            d = df[["epoch", col]].dropna().groupby("epoch")[col].last()
            series[col] = list(zip(d.index.tolist(), d.tolist()))
    return plot_curves(series, run_dir / "figures" / "training" / "curves.png") if series else None


def train(cfg: DictConfig) -> float | None:
    """Train and evaluate one configuration; return ``cfg.optimized_metric`` for sweepers.

    The run folder records its state in ``status.json`` (``running`` -> ``completed`` or ``failed``
    with the error), so a sweep summary can tell failed jobs from finished ones.
    """
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if cfg.get("pipeline"):
        return _pipeline(cfg, run_dir)
    if global_rank() != 0:
        # another DDP rank, started by Lightning in rank 0's folder: it trains, rank 0 writes. On a
        # resume it must start from the same checkpoint as rank 0 (rank 0 has checked and recorded it).
        resuming = bool(cfg.get("resume") and cfg.resume.get("enabled"))
        if resuming:
            log.logger.info(f"rank {global_rank()}: resuming from {resume_checkpoint(run_dir)}")
        return _train(cfg, run_dir, {"checkpoint": resume_checkpoint(run_dir), "index": None} if resuming else None,
                      writer=False)
    resume = None
    if cfg.get("resume") and cfg.resume.get("enabled"):
        # the resumed config is composed from the run folder's own overrides: check what it would instantiate
        check_targets(cfg, f"{run_dir}/.hydra/overrides.yaml (resume)", command_policy())
        diffs = check_resume_config(cfg, run_dir)
        ckpt = resume_checkpoint(run_dir)
        resume = {"checkpoint": ckpt, "index": record_resume(run_dir, ckpt, diffs) + 1}
        log.info(f"resuming {run_dir} from {ckpt}" + (f" with forced changes {diffs}" if diffs else ""))
    else:
        claim_run_dir(run_dir, {"task_name": cfg.task_name, "seed": int(cfg.seed)})
    write_json(run_dir / "status.json", {"status": "running"})
    try:
        with _SIGTERM:
            value = _train(cfg, run_dir, resume)
    except (KeyboardInterrupt, SystemExit) as err:  # SIGTERM (SIGTERMException) or Ctrl-C (Lightning exits 1)
        _interrupted(run_dir, err)
    except Exception as err:
        if _SIGTERM.received:  # the signal came first; this error is its consequence (e.g. a DDP peer gone)
            _interrupted(run_dir, err)
        _mark_failed(run_dir, err)
        if _in_sweep() and cfg.get("sweep_continue_on_failure", True) and not _optuna_sweep():
            # one failing job must not end a basic-sweeper multirun (Hydra re-raises a job's error
            # after the batch): recorded in status.json and the summary, returned as NaN. The Optuna
            # sweeper gets the exception itself, marks the trial FAILED and samples on
            # (hydra.sweeper.max_failure_rate in conf/hparams_search/*_optuna.yaml).
            log.exception(f"job failed, the sweep continues: {type(err).__name__}: {err}")
            return float("nan")
        raise
    write_json(run_dir / "status.json", {"status": "completed", "optimized_metric": cfg.get("optimized_metric"),
                                         "value": value})
    return value


_SIGTERM = SigtermWatch()


def _mark_failed(run_dir: Path, err: BaseException) -> None:
    """``status.json`` = failed with the error, best effort: on a full disk this write may fail too, and the
    run's own error (what the user must see) is not replaced by it."""
    try:
        write_json(run_dir / "status.json", {"status": "failed", "error": f"{type(err).__name__}: {err}"})
    except OSError as also:
        log.error(f"could not record the failure in {run_dir / 'status.json'} ({also})")


def _pipeline(cfg: DictConfig, run_dir: Path) -> float | None:
    """A study of several runs (``pipeline`` in the config, e.g. ``experiment=minim_quality``): its stages
    are ordinary runs in sub-folders of this run folder; it writes its own metrics and report."""
    if cfg.get("resume") and cfg.resume.get("enabled"):
        raise RunDirError("resume=true: a pipeline is not resumed; give its finished stages as inputs instead "
                          "(e.g. pipeline.generator_run, pipeline.selector_run, pipeline.finetune_run)")
    claim_run_dir(run_dir, {"task_name": cfg.task_name, "seed": int(cfg.seed), "pipeline": cfg.pipeline.get("_target_")})
    write_json(run_dir / "status.json", {"status": "running"})
    setup_runtime(cfg)
    atomic_write_bytes(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode())
    try:
        pipeline = instantiate(cfg.pipeline, _convert_="all")  # a target of the project's conf/ tree
        result = pipeline.execute(run_dir)  # runs its stages, writes its metrics and report
    except Exception as err:
        _mark_failed(run_dir, err)
        raise
    write_json(run_dir / "status.json", {"status": "completed"})
    log.info(f"pipeline folder: {run_dir}  report: {run_dir / 'report' / 'index.html'}")
    value = result.get("quality", {}).get(str(cfg.get("optimized_metric") or "").split("/")[-1])
    return float(value) if isinstance(value, (int, float)) else None


def _interrupted(run_dir: Path, err: BaseException) -> None:
    """Record an interrupted run (status + resume command) and exit like a killed process."""
    ckpt = run_dir / "checkpoints" / "interrupted.ckpt"
    sigterm = _SIGTERM.received or type(err).__name__ == "SIGTERMException"
    write_json(run_dir / "status.json", {"status": "interrupted", "error": f"{type(err).__name__}: {err}".rstrip(": "),
                                         "signal": "SIGTERM" if sigterm else "SIGINT",
                                         "checkpoint": str(ckpt) if ckpt.is_file() else None,
                                         "resume": f"python train.py run_dir={run_dir} resume=true"})
    log.warning(f"interrupted ({type(err).__name__}); resume with: python train.py run_dir={run_dir} resume=true")
    # Lightning turns SIGTERM into SystemExit() (exit code 0): exit like a killed process instead
    raise SystemExit(143 if sigterm else 130) from err


def _in_sweep() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:  # no Hydra context (library use)
        return False


def _optuna_sweep() -> bool:
    try:
        return "optuna" in str(HydraConfig.get().sweeper.get("_target_", "")).lower()
    except ValueError:
        return False


def global_rank() -> int:
    """This process's rank from the launcher's environment (0 when not distributed)."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if os.environ.get(key) is not None:
            return int(os.environ[key])
    return 0


def _train(cfg: DictConfig, run_dir: Path, resume: dict[str, Any] | None = None, writer: bool = True) -> float | None:
    if writer and resume is None:
        atomic_write_bytes(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode())
    elif writer:  # keep the run's config; loggers continue in a folder of their own (nothing overwritten)
        atomic_write_bytes(run_dir / f"config_resume{resume['index']}.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode())
        if cfg.get("logger") and cfg.logger.get("csv"):
            cfg.logger.csv.version = f"resume{resume['index']}"
        wandb_id = json.loads((run_dir / "run.json").read_text()).get("wandb_id")
        if wandb_id and cfg.get("logger") and cfg.logger.get("wandb"):
            cfg.logger.wandb.id = wandb_id  # the same W&B run continues
    setup_runtime(cfg)
    # Build everything from the config first (cheap, fails fast on bad keys), then read the data.
    task = build_task(cfg)
    if writer and getattr(task, "init_report", None):
        write_json(run_dir / "init_from.json", {"checkpoint": cfg.model.get("init_from"), **task.init_report})
    dm = instantiate(cfg.data)
    callbacks = instantiate_list(cfg.get("callbacks")) + explanation_callbacks(cfg.get("xai"), int(cfg.seed),
                                                                           run_dir / "figures" / "training")
    loggers = instantiate_list(cfg.get("logger"))
    if writer:
        for lg in loggers:
            if type(lg).__name__ == "WandbLogger":
                update_run_json(run_dir, {"wandb_id": lg.experiment.id, "wandb_dir": str(run_dir / "wandb")})
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                     plugins=[AtomicCheckpointIO()])
    check_evaluation(cfg.get("evaluation"))  # settings wrong whatever the data fail before training
    dm.setup("fit")  # reads + validates train/val now, so bad data fails before any training
    task.check_data(dm, cfg.get("evaluation"))  # what the task needs of the splits (a classifier: two classes in val)
    if dm.has_split("test"):
        dm.load_split("test")
    if not writer:
        digest = ""
    elif resume is not None:
        saved = json.loads((run_dir / "splits" / "splits.json").read_text())["sha256"]
        digest = dm.write_splits(run_dir / "splits" / f"resume{resume['index']}")
        if digest != saved:
            raise RunDirError(f"resume refused: the data split differs from the run's (sha256 {digest[:12]} vs "
                              f"{saved[:12]} in {run_dir}/splits/splits.json)")
    else:
        digest = dm.write_splits(run_dir / "splits")
    log.info(f"data: {dm.summary()} (splits sha256 {digest[:12]})")

    t0 = time.perf_counter()
    if cfg.get("train", True):
        _SIGTERM.fitting = True  # Lightning's handler stops at the next batch and checkpoints
        # With an OnExceptionCheckpoint, Lightning turns fit(ckpt_path=None) into "last" and warns twice.
        # A new run's folder is new (claimed above), so "last" finds nothing; a resume passes its path.
        warnings.filterwarnings("ignore", message=r".*fit\(ckpt_path=None\)` was called without a model")
        warnings.filterwarnings("ignore", message=r'.*fit\(ckpt_path="last"\) is set, but there is no last checkpoint')
        try:
            # a full training checkpoint (optimizer, scheduler, callback states) also loads with
            # weights_only=True: nothing in a run folder can run code on resume
            trainer.fit(task, datamodule=dm, ckpt_path=str(resume["checkpoint"]) if resume else None,
                        weights_only=True)
        finally:
            _SIGTERM.fitting = False
    else:
        # train=false evaluates the weights training would have started from: the task's fit-time setup
        # (e.g. a generator's model.vae_run, loaded at fit start) runs as trainer.fit would run it
        task.setup("fit")
    fit_seconds = time.perf_counter() - t0
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # the final evaluation is rank 0's alone: leave the process group so metric objects do not
        # wait for ranks that have finished
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()

    ckpt = _best_checkpoint(trainer, run_dir)
    if ckpt is not None:
        load_weights(task, ckpt)
    results: dict[str, EvalResult] = {}
    if trainer.is_global_zero:
        extra = {"checkpoint": str(ckpt) if ckpt else None, "fit_seconds": round(fit_seconds, 1),
                 "epochs": int(trainer.current_epoch), "seed": int(cfg.seed),
                 "checkpoint_chosen_on": _chosen_on(cfg)}
        fitted = task.post_fit(dm, run_dir, cfg.get("evaluation"))  # e.g. temperature on the calibration split
        splits = ["val"] + (["test"] if cfg.get("test", True) and dm.has_split("test") else [])
        for split in splits:
            results[split] = task.evaluate_split(dm, split, run_dir, cfg.get("evaluation"), extra, fitted)
            for msg in results[split].metrics.get("refused") or []:
                log.warning(f"{split}: refused: {msg} (the run and its other figures are kept; evaluate.py with other "
                            "settings can give it)")
        _log_final(loggers, results, run_dir, cfg)
        training_curves(run_dir, str(cfg.model.get("monitor") or ""))
        report = build_run_report(run_dir, task=type(task), title=f"medtrust {task.task_name} run")
        log.info(f"run folder: {run_dir}  report: {report}")
    _finish_wandb(loggers)
    return _metric_value(cfg, results)


def _chosen_on(cfg: DictConfig) -> str:
    """What chose the evaluated checkpoint: val (a monitored metric) or nothing (the last epoch)."""
    mc = OmegaConf.select(cfg, "callbacks.model_checkpoint")
    if not cfg.get("train", True):
        return "none (not trained: the initial weights)"
    return "val" if mc is None or mc.get("monitor") else "none (the last epoch)"


def _best_checkpoint(trainer: L.Trainer, run_dir: Path) -> Path | None:
    """The checkpoint that is evaluated: the explanation callback's selection when it selects
    (``xai.callback.select``), else ModelCheckpoint's best, else ``last.ckpt``."""
    chosen = selected_checkpoint(trainer)
    if chosen is not None:
        return Path(chosen)
    cb = trainer.checkpoint_callback
    best = getattr(cb, "best_model_path", "") if cb else ""
    if best and Path(best).is_file():
        return Path(best)
    last = run_dir / "checkpoints" / "last.ckpt"
    return last if last.is_file() else None


def _log_final(loggers: list[Any], results: dict[str, EvalResult], run_dir: Path | None = None,
               cfg: DictConfig | None = None) -> None:
    flat = {}
    for split, res in results.items():
        flat.update({f"final/{split}/{k}": v for k, v in res.scalars(include_counts=True).items()})
    for lg in loggers:
        lg.log_metrics(flat)
        if run_dir is not None and type(lg).__name__ == "WandbLogger":
            _log_wandb_artifacts(lg, run_dir, results, cfg)
        lg.save()


WANDB_TABLE_MAX_ROWS = 5000


def _log_wandb_artifacts(lg: Any, run_dir: Path, results: dict[str, EvalResult], cfg: DictConfig | None) -> None:
    """Figures as W&B images and every table of the evaluation results as a W&B table (plus the
    full resolved config)."""
    if cfg is not None:
        lg.experiment.config.update({"medtrust": OmegaConf.to_container(cfg, resolve=True)}, allow_val_change=True)
    for png in sorted((run_dir / "figures").rglob("*.png")):
        lg.log_image(key=f"figures/{png.relative_to(run_dir / 'figures').with_suffix('').as_posix()}", images=[str(png)])
    for res in results.values():
        for csv in res.tables.values():
            df = pd.read_csv(csv)
            if len(df) <= WANDB_TABLE_MAX_ROWS:
                lg.log_table(key=f"tables/{Path(csv).stem}", dataframe=df)


def _finish_wandb(loggers: list[Any]) -> None:
    """End this job's W&B run, so the next job of a multirun starts its own."""
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger" and getattr(lg, "_experiment", None) is not None:
            lg.experiment.finish()


def _metric_value(cfg: DictConfig, results: dict[str, EvalResult]) -> float | None:
    """Look up e.g. ``val/seg/dice`` in the evaluation results."""
    name = cfg.get("optimized_metric")
    if not name:
        return None
    parts = str(name).split("/")
    if len(parts) != 3 or parts[0] not in results:
        return None
    return results[parts[0]].value(parts[1], parts[2])
