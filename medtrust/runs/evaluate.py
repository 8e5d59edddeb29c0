"""What ``evaluate.py`` does: rebuild trained runs from their saved configs and evaluate them on
any compatible data, alone, as an ensemble, or side by side. Everything task-specific is the
task's (:class:`medtrust.tasks.base.Task`): this module never branches on a task."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from medtrust.evaluation.config import check_evaluation
from medtrust.report.html import build_run_report
from medtrust.runs.builders import (
    data_config_for,
    data_overridden,
    evaluation_config_for,
    load_run_models,
    rebuild_task,
    same_preprocessing,
    same_split,
    setup_runtime,
    split_digest,
    task_class,
)
from medtrust.runs.rundir import (RunDirError, allow_targets, check_run_dir, claim_run_dir, find_checkpoint,
                                  load_run_config)
from medtrust.utils.io import atomic_write_bytes, write_csv, write_json
from medtrust.utils.logging import get_logger

log = get_logger(__name__)


def _split(cfg: DictConfig) -> str:
    return "test" if cfg.split == "all" else str(cfg.split)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate one run (``run_dir``), an ensemble (``ensemble_runs``) or compare several (``run_dirs``)."""
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    setup_runtime(cfg)
    allow_targets((cfg.get("security") or {}).get("allow_targets"))
    if cfg.get("report", "run") not in ("run", "compare"):
        raise ValueError(f"report must be run or compare, got {cfg.report!r}")
    if cfg.get("report") == "compare" and not cfg.get("run_dirs"):
        raise ValueError('report=compare needs "run_dirs=[runA,runB,...]"')
    if cfg.get("audit"):
        from medtrust.audit.run import run_audit

        return run_audit(cfg, out_dir)
    if cfg.get("run_dirs"):
        return compare(cfg, out_dir)
    if cfg.get("ensemble_runs"):
        return evaluate_run_ensemble(cfg, out_dir)
    run_dir = check_run_dir(cfg.run_dir)
    check_evaluation(cfg.get("evaluation"))
    cls = task_class(run_dir)
    claim_run_dir(out_dir, {"kind": "evaluation", "run_dir": str(run_dir.resolve()), "task_name": cls.task_name})
    run_cfg = data_config_for(run_dir, cfg)
    ckpt = find_checkpoint(run_dir, str(cfg.checkpoint))
    task = rebuild_task(run_cfg, ckpt, cfg.get("threshold"), cfg.get("tta"))
    dm = instantiate(run_cfg.data)
    extra = {"run_dir": str(run_dir.resolve()), "checkpoint": str(ckpt), "evaluated_split": str(cfg.split),
             "data_overrides": [o for o in HydraConfig.get().overrides.task if o.startswith("data")],
             "run_split_sha256": split_digest(run_dir)}
    if cfg.split == "all" and not data_overridden(run_dir):
        # every row of the run's own data: the images it was trained, calibrated and selected on too
        extra.update({"contains_training_images": True,
                      "in_sample": ["all (split=all on the run's own data includes its training, calibration and "
                                    "validation images)"]})
    if cfg.get("refit"):
        # fitted again on the run's data splits (not the evaluated file) with this evaluation's settings
        fitted = task.post_fit(instantiate(load_run_config(run_dir).data), out_dir,
                               evaluation_config_for(run_cfg, cfg, run_dir))
        extra["fitted_from"] = f"refit=true: fitted again into {out_dir}"
    else:
        fitted = cls.load_post_fit(run_dir)
        if fitted:
            extra["fitted_from"] = str(run_dir)
    evaluation = _with_shift(cfg, evaluation_config_for(run_cfg, cfg, run_dir), cls)
    # a missing, empty or unreadable OOD set and a mistyped shift benchmark stop before anything is computed
    _check_ood_sets(cfg, str(run_cfg.data.get("on_bad", "error")))
    _check_shift(cfg)
    result = task.evaluate_split(dm, _split(cfg), out_dir, evaluation, extra, fitted)
    dm.write_skipped(out_dir / "splits")
    _stop_if_refused(result)
    _score_ood(cfg, task, dm, out_dir, evaluation, fitted)
    _shift_benchmark(cfg, task, dm, out_dir, evaluation, fitted)
    atomic_write_bytes(out_dir / "config.yaml", OmegaConf.to_yaml(run_cfg, resolve=True).encode())
    build_run_report(out_dir, task=cls, title=f"medtrust evaluation of {run_dir.name}")
    log.info(f"evaluation written to {out_dir}")
    return result.metrics


def _stop_if_refused(result: Any) -> None:
    """What the evaluation could not honour (``metrics["refused"]``, e.g. a calibration split too small
    for the asked conformal alpha) stops evaluate.py with the message; train.py only warns (its run is kept)."""
    refused = result.metrics.get("refused")
    if refused:
        raise ValueError("; ".join(str(r) for r in refused))


def _with_shift(cfg: DictConfig, evaluation: Any, cls: Any) -> Any:
    """``shift.label_shift`` / ``shift.adapt_bn`` apply to the evaluated split: copied into the task's
    evaluation settings (``evaluation.shift``), which must have them."""
    from medtrust.evaluation.config import evaluation_config

    sh = cfg.get("shift") or {}
    asked = {k: sh.get(k) for k in ("label_shift", "adapt_bn") if sh.get(k)}
    if not asked:
        return evaluation
    try:
        evaluation = evaluation_config(cls.evaluation_config, evaluation)  # a run saved before a key existed
    except FileNotFoundError:
        pass
    if evaluation is None or "shift" not in evaluation:
        raise ValueError(f"shift.{'/'.join(asked)}: this run's task has no label-shift / batch-norm adaptation "
                         "(classifier runs do)")
    return OmegaConf.merge(evaluation, {"shift": asked})


def _shift_benchmark(cfg: DictConfig, task: Any, dm: Any, out_dir: Path, evaluation: Any, fitted: Any) -> None:
    """``shift=corruptions`` and ``shift.prevalence=[...]``: the task scores the split under shift."""
    sh = cfg.get("shift") or {}
    if sh.get("benchmark") or sh.get("prevalence"):
        task.evaluate_shift(dm, _split(cfg), out_dir, evaluation, fitted, OmegaConf.to_container(sh, resolve=True))


def _check_ood_sets(cfg: DictConfig, on_bad: str) -> None:
    from medtrust.evaluation.ood import check_readable, list_images

    sets = (cfg.get("ood") or {}).get("sets")
    if sets and not isinstance(sets, str):
        for i, spec in enumerate(sets):
            check_readable(list_images(str(spec), f"ood.sets[{i}]"), f"ood.sets[{i}]", on_bad)


def _check_shift(cfg: DictConfig) -> None:
    from medtrust.evaluation.shift import check_spec

    sh = cfg.get("shift") or {}
    if sh.get("benchmark") == "corruptions" or sh.get("prevalence"):
        check_spec(OmegaConf.to_container(sh, resolve=True))


def _score_ood(cfg: DictConfig, task: Any, dm: Any, out_dir: Path, evaluation: Any, fitted: Any) -> None:
    """``ood.sets=[...]``: the task scores the evaluated split against each set (``metrics/ood.json``)."""
    sets = (cfg.get("ood") or {}).get("sets")
    if sets:
        if isinstance(sets, str):
            raise ValueError(f'ood.sets must be a list, e.g. "ood.sets=[{sets}]", got the string {sets!r}')
        task.score_ood(dm, _split(cfg), [str(s) for s in sets], out_dir, evaluation, fitted)


def _check_together(runs: list[Path], base: DictConfig, what: str) -> None:
    """Same preprocessing; and, on the runs' own data, the same split (no patient leakage)."""
    same_preprocessing(runs[1:], base)
    if data_overridden(runs[0]):
        digests = {str(r): split_digest(r) for r in runs}
        if len(set(digests.values())) > 1:
            log.warning(f"{what}: the runs were trained on different splits ({digests}); evaluated on other data, "
                        "which none of them trained on, that is allowed")
    else:
        same_split(runs, what)


def evaluate_run_ensemble(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Deep ensemble assembled from M run folders (``ensemble_runs=[...]``, if the task supports it):
    members must share preprocessing and the training split; what the task fits after training
    (e.g. a temperature) is refitted for the ensemble, and everything is written like a single
    run's evaluation."""
    runs = [check_run_dir(r, "ensemble_runs") for r in cfg.ensemble_runs]
    classes = {task_class(r) for r in runs}
    if len(classes) > 1:
        raise RunDirError(f"ensemble_runs mix tasks {sorted(c.task_name for c in classes)}")
    cls = classes.pop()
    claim_run_dir(out_dir, {"kind": "ensemble", "ensemble_runs": [str(r.resolve()) for r in runs],
                            "task_name": cls.task_name})
    base = data_config_for(runs[0], cfg)
    _check_together(runs, base, "ensemble_runs")
    members = load_run_models(runs, base, cfg)
    head = cls.ensemble_of([m.task for m in members])
    dm = instantiate(base.data)
    evaluation = _with_shift(cfg, evaluation_config_for(base, cfg), cls)  # no one member's settings: the file's
    fitted = head.post_fit(dm, out_dir, evaluation)
    extra = {"ensemble_runs": [str(r) for r in runs], "checkpoint": str(cfg.checkpoint),
             "run_split_sha256": split_digest(runs[0])}
    result = head.evaluate_split(dm, _split(cfg), out_dir, evaluation, extra, fitted)
    dm.write_skipped(out_dir / "splits")
    _stop_if_refused(result)
    _score_ood(cfg, head, dm, out_dir, evaluation, fitted)
    _shift_benchmark(cfg, head, dm, out_dir, evaluation, fitted)
    build_run_report(out_dir, task=cls, title=f"medtrust ensemble of {len(runs)} runs")
    log.info(f"ensemble evaluation written to {out_dir}")
    return result.metrics


def compare(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Evaluate several runs of one task on the same images (``task.compare``): a table (CSV +
    markdown + JSON), the task's figures and a comparison report.

    Raises:
        RunDirError: runs of different tasks, preprocessing or (on their own data) splits.
    """
    runs = [check_run_dir(r, "run_dirs") for r in cfg.run_dirs]
    classes = {task_class(r) for r in runs}
    if len(classes) > 1:
        raise RunDirError(f"run_dirs mix tasks {sorted(c.task_name for c in classes)}: only runs of one task "
                          "can be compared")
    cls = classes.pop()
    claim_run_dir(out_dir, {"kind": "comparison", "run_dirs": [str(r.resolve()) for r in runs],
                            "task_name": cls.task_name})
    base = data_config_for(runs[0], cfg)
    _check_together(runs, base, "run_dirs")
    dm = instantiate(base.data)
    split = _split(cfg)
    rows = cls.compare(load_run_models(runs, base, cfg), dm, split, out_dir, evaluation_config_for(base, cfg),
                       int(cfg.n_compare))
    dm.write_skipped(out_dir / "splits")
    df = pd.DataFrame(rows)
    write_csv(out_dir / "comparison.csv", df)
    atomic_write_bytes(out_dir / "comparison.md",
                       (df.drop(columns="run_dir", errors="ignore").to_markdown(index=False, floatfmt=".4f") + "\n").encode())
    write_json(out_dir / "metrics" / "comparison.json", {"split": split, "task": cls.task_name, "runs": rows,
                                                         "data": dm.summary()})
    build_run_report(out_dir, task=cls, title="medtrust run comparison")
    log.info(f"comparison written to {out_dir}\n{df.drop(columns='run_dir', errors='ignore').to_string(index=False)}")
    return {"runs": rows}
