"""What ``evaluate.py`` does: rebuild trained runs from their saved configs and evaluate them on
any compatible data, alone or side by side."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from medtrust.metrics.segmentation import compute_confusion, compute_segmentation_metrics, per_image_scores
from medtrust.report.figures import plot_comparison
from medtrust.report.html import build_run_report
from medtrust.runs.rundir import (
    RunDirError,
    check_run_dir,
    claim_run_dir,
    find_checkpoint,
    load_run_calibration,
    load_run_choices,
    load_run_config,
    load_weights,
)
from medtrust.runs.train import build_task, setup_runtime
from medtrust.utils.io import atomic_write_bytes, write_json
from medtrust.utils.logging import get_logger

log = get_logger(__name__)

# Preprocessing the model was trained with; kept from the run when the data group is switched.
PREPROCESSING_KEYS = ("image_size", "channels", "normalize", "require_mask", "augment", "num_classes")
# What runs must share to be compared or ensembled (training augmentation may differ).
COMPARABLE_KEYS = ("image_size", "channels", "normalize", "num_classes")


def _arg_value(argv: list[str], key: str) -> str | None:
    for a in argv[1:]:
        if a.startswith(f"{key}="):
            return a.split("=", 1)[1]
    return None


def _parse_list(text: str) -> list[str]:
    return [t.strip().strip("'\"") for t in text.strip().strip("[]").split(",") if t.strip()]


def prepare_argv(argv: list[str], multi: bool = True, choose_xai: bool = False) -> list[str]:
    """Check ``run_dir``/``run_dirs`` before Hydra creates any folder, and select the run's own
    ``data`` group (and, for explain.py, the ``xai`` suite of the run's task: ``xai=<task_name>``)
    unless the command line chooses one.

    Raises:
        RunDirError: a run folder is missing or is not a medtrust run.
    """
    run_dir, run_dirs = _arg_value(argv, "run_dir"), _arg_value(argv, "run_dirs")
    ens = _arg_value(argv, "ensemble_runs")
    runs = [run_dir] if run_dir not in (None, "null") else []
    for many in (run_dirs, ens):
        if many not in (None, "null"):
            runs += _parse_list(str(many))
    if any(a.startswith(("-h", "--help", "--cfg", "--info")) for a in argv[1:]):
        return argv
    if not runs:
        hint = ' (or "run_dirs=[runA,runB]" to compare runs)' if multi else ""
        raise RunDirError(f"give run_dir=<run folder>{hint}")
    for r in runs:
        check_run_dir(r, "run_dir" if r == run_dir else "run_dirs")
    choice = load_run_choices(runs[0]).get("data")
    if choice and not any(re.match(r"^data=", a) for a in argv[1:]):
        argv = [*argv, f"data={choice}"]
    if choose_xai and not any(re.match(r"^xai=", a) for a in argv[1:]):
        task_name = load_run_config(runs[0]).get("task_name")
        if task_name and (Path(__file__).parents[2] / "conf" / "xai" / f"{task_name}.yaml").is_file():
            argv = [*argv, f"xai={task_name}"]
    return argv


def _override_keys() -> list[str]:
    keys = []
    for o in HydraConfig.get().overrides.task:
        key = o.split("=", 1)[0].lstrip("+~")
        keys.append(key)
    return keys


def data_config_for(run_dir: str | Path, cfg: DictConfig) -> DictConfig:
    """The run's data config with this command's ``data`` changes applied.

    ``data.<key>=...`` overrides change only those keys (so ``data.manifest=<other CSV>`` keeps the
    run's image size, normalisation and split settings); ``data=<choice>`` switches source but
    keeps the run's preprocessing (:data:`PREPROCESSING_KEYS`). ``split=all`` evaluates every row.
    """
    run_cfg = load_run_config(run_dir)
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
    if cfg.split == "all":
        run_cfg.data.splits.use_source = False
        run_cfg.data.splits.fractions = {"train": 0.0, "val": 0.0, "test": 1.0}
    return run_cfg


def rebuild_task(run_cfg: DictConfig, ckpt: Path, threshold: float | None = None,
                 tta: list[str] | None = None) -> torch.nn.Module:
    """Instantiate the run's task from its config and load the checkpoint (``weights_only=True``);
    ``threshold``/``tta`` override the run's values when given."""
    extra = {"tta": list(tta)} if tta is not None else {}
    task = build_task(run_cfg, init_from=None, **extra)
    load_weights(task, ckpt)
    if threshold is not None:
        task.threshold = float(threshold)
    return task.eval()


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate one run (``run_dir``) or compare several (``run_dirs``)."""
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    setup_runtime(cfg)
    if cfg.get("report", "run") not in ("run", "compare"):
        raise ValueError(f"report must be run or compare, got {cfg.report!r}")
    if cfg.get("report") == "compare" and not cfg.get("run_dirs"):
        raise ValueError('report=compare needs "run_dirs=[runA,runB,...]"')
    if cfg.get("run_dirs"):
        return compare(cfg, out_dir)
    if cfg.get("ensemble_runs"):
        return evaluate_run_ensemble(cfg, out_dir)
    run_dir = check_run_dir(cfg.run_dir)
    claim_run_dir(out_dir, {"kind": "evaluation", "run_dir": str(run_dir.resolve())})
    run_cfg = data_config_for(run_dir, cfg)
    ckpt = find_checkpoint(run_dir, str(cfg.checkpoint))
    task = rebuild_task(run_cfg, ckpt, cfg.get("threshold"), cfg.get("tta"))
    dm = instantiate(run_cfg.data)
    split = "test" if cfg.split == "all" else str(cfg.split)
    extra = {"run_dir": str(run_dir.resolve()), "checkpoint": str(ckpt), "evaluated_split": str(cfg.split),
             "data_overrides": [o for o in HydraConfig.get().overrides.task if o.startswith("data")]}
    calibration = load_run_calibration(run_dir)
    if calibration:
        extra["calibration_from"] = str(run_dir / "calibration.json")
    result = task.evaluate_split(dm, split, out_dir, cfg.get("evaluation"), extra, calibration)
    per_split = out_dir / f"{split}_predictions.csv"
    if per_split.exists():  # one split per evaluation folder: predictions.csv
        per_split.rename(out_dir / "predictions.csv")
    atomic_write_bytes(out_dir / "config.yaml", OmegaConf.to_yaml(run_cfg.data, resolve=True).encode())
    build_run_report(out_dir, title=f"medtrust evaluation of {run_dir.name}")
    log.info(f"evaluation written to {out_dir}")
    return result


def _same_preprocessing(runs: list[Path], base: DictConfig) -> None:
    """Raise unless every run was trained with the preprocessing of ``base.data``."""
    for r in runs:
        other = load_run_config(r).data
        for k in COMPARABLE_KEYS:
            a = OmegaConf.to_container(OmegaConf.create({"v": OmegaConf.select(base.data, k)}), resolve=True)
            b = OmegaConf.to_container(OmegaConf.create({"v": OmegaConf.select(other, k)}), resolve=True)
            if a != b:
                raise RunDirError(f"runs differ in data.{k}: {runs[0]} has {a['v']}, {r} has {b['v']}; "
                                  "only runs trained with the same preprocessing can be compared or ensembled")


def evaluate_run_ensemble(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Deep ensemble assembled from M classifier run folders (``ensemble_runs=[...]``): members
    must share input size, channels, normalisation and classes; a temperature for the ensemble is
    fitted on the validation split and everything is written like a single run's evaluation."""
    from medtrust.nets.classifier import RunEnsemble

    runs = [check_run_dir(r, "ensemble_runs") for r in cfg.ensemble_runs]
    claim_run_dir(out_dir, {"kind": "ensemble", "ensemble_runs": [str(r.resolve()) for r in runs]})
    base = data_config_for(runs[0], cfg)
    _same_preprocessing(runs[1:], base)
    tasks = []
    for r in runs:
        run_cfg = load_run_config(r)
        run_cfg.data = base.data
        tasks.append(rebuild_task(run_cfg, find_checkpoint(r, str(cfg.checkpoint))))
    if any(getattr(t, "task_name", "") != "classification" for t in tasks):
        raise RunDirError("ensemble_runs must all be classification runs")
    head = tasks[0]
    head.net = RunEnsemble([t.net for t in tasks])
    head.mc_samples = 0
    dm = instantiate(base.data)
    calibration = head.post_fit(dm, out_dir, cfg.get("evaluation"))
    split = "test" if cfg.split == "all" else str(cfg.split)
    extra = {"ensemble_runs": [str(r) for r in runs], "checkpoint": str(cfg.checkpoint)}
    result = head.evaluate_split(dm, split, out_dir, cfg.get("evaluation"), extra, calibration)
    build_run_report(out_dir, title=f"medtrust ensemble of {len(runs)} runs")
    log.info(f"ensemble evaluation written to {out_dir}")
    return result


def _label(run_dir: Path, taken: set[str]) -> str:
    ch = load_run_choices(run_dir)
    label = "/".join(x for x in (ch.get("experiment") or ch.get("model", "model"), ch.get("loss")) if x)
    if label in taken:
        label = f"{label} ({run_dir.name})"
    taken.add(label)
    return label


def compare(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Evaluate several runs on the same images: table (CSV + markdown) and side-by-side figure.

    Raises:
        RunDirError: the runs were trained with different preprocessing.
    """
    from medtrust.evaluation.segmentation import predict_split

    runs = [check_run_dir(r, "run_dirs") for r in cfg.run_dirs]
    claim_run_dir(out_dir, {"kind": "comparison", "run_dirs": [str(r.resolve()) for r in runs]})
    base_cfg = data_config_for(runs[0], cfg)
    _same_preprocessing(runs[1:], base_cfg)
    dm = instantiate(base_cfg.data)
    split = "test" if cfg.split == "all" else str(cfg.split)
    tasks = {str(load_run_config(r).get("task_name")) for r in runs}
    if len(tasks) > 1:
        raise RunDirError(f"run_dirs mix tasks {sorted(tasks)}: only runs of one task can be compared")
    if tasks == {"classification"}:
        return compare_classifiers(cfg, runs, base_cfg, dm, split, out_dir)
    rows, preds, dices, taken = [], {}, {}, set()
    gt = None
    for r in runs:
        run_cfg = load_run_config(r)
        run_cfg.data = base_cfg.data
        ckpt = find_checkpoint(r, str(cfg.checkpoint))
        task = rebuild_task(run_cfg, ckpt, cfg.get("threshold"), cfg.get("tta"))
        out = predict_split(task, dm, split)
        conf = compute_confusion(out["prob"], out["mask"], task.threshold)
        m = compute_segmentation_metrics(conf)
        label = _label(r, taken)
        rows.append({"run": label, "run_dir": str(r), **{k: m[k] for k in
                     ("dice", "iou", "precision", "recall", "accuracy", "f1", "fp_rate", "fn_rate")}})
        preds[label] = (out["prob"] >= task.threshold).float().numpy()[:, 0]
        dices[label] = per_image_scores(conf)["dice"].numpy()
        gt = out["mask"].numpy()[:, 0]
    df = pd.DataFrame(rows)
    atomic_write_bytes(out_dir / "comparison.csv", df.to_csv(index=False).encode())
    atomic_write_bytes(out_dir / "comparison.md", (df.drop(columns="run_dir").to_markdown(index=False, floatfmt=".4f") + "\n").encode())
    # Show the images on which the runs disagree most (largest spread of per-image Dice).
    import numpy as np

    spread = np.stack(list(dices.values())).std(0)
    ids = np.argsort(-spread, kind="stable")[: int(cfg.n_compare)]
    images = [dm.raw_image(split, int(i)) for i in ids]
    plot_comparison(images, [gt[i] for i in ids], {k: [v[i] for i in ids] for k, v in preds.items()},
                    {k: [float(v[i]) for i in ids] for k, v in dices.items()},
                    out_dir / "figures" / "comparison" / "comparison.png",
                    suptitle=f"{split}: images where the runs' Dice differs most")
    write_json(out_dir / "metrics" / "comparison.json", {"split": split, "runs": rows, "data": dm.summary()})
    build_run_report(out_dir, title="medtrust run comparison")
    log.info(f"comparison written to {out_dir}\n{df.drop(columns='run_dir').to_string(index=False)}")
    return {"runs": rows}


def compare_classifiers(cfg: DictConfig, runs: list[Path], base_cfg: DictConfig, dm: Any, split: str,
                        out_dir: Path) -> dict[str, Any]:
    """Classifier runs on the same images: each with its own primary uncertainty method and the
    temperature it fitted (calibration.json): AUROC, accuracy, ECE (equal-width and adaptive),
    Brier, NLL, AURC, plus their risk-coverage curves in one figure."""
    from medtrust.evaluation.classification import DEFAULTS, collect, method_logits, primary_method, probs_of
    from medtrust.metrics.classification import compute_classification_metrics, risk_coverage
    from medtrust.report import figures
    from medtrust.runs.rundir import load_run_calibration

    ev = {**DEFAULTS, **dict(cfg.get("evaluation") or {})}
    rows, curves, taken = [], {}, set()
    for r in runs:
        run_cfg = load_run_config(r)
        run_cfg.data = base_cfg.data
        task = rebuild_task(run_cfg, find_checkpoint(r, str(cfg.checkpoint)))
        cal = load_run_calibration(r) or {}
        coll = collect(task, dm, split, int(ev["mc_seed"]))
        if coll["labels"] is None:
            raise ValueError(f"comparing classifiers needs labelled images in split {split!r}")
        methods = method_logits(task, coll)
        primary = cal.get("primary_method") or primary_method(methods, str(ev["uncertainty_method"]))
        t = float(cal.get("temperatures", {}).get(primary, 1.0))
        probs = probs_of(methods[primary], t)
        m = compute_classification_metrics(probs, coll["labels"], int(ev["calibration_bins"]))
        label = _label(r, taken)
        rows.append({"run": label, "run_dir": str(r), "method": primary, "temperature": t,
                     **{k: m[k] for k in ("auroc", "accuracy", "f1", "ece", "ece_adaptive", "brier", "nll", "aurc")}})
        conf, pred = probs.max(1)
        cov, risk = risk_coverage(conf, pred == coll["labels"])
        curves[label] = (cov.numpy(), risk.numpy())
    df = pd.DataFrame(rows)
    atomic_write_bytes(out_dir / "comparison.csv", df.to_csv(index=False).encode())
    atomic_write_bytes(out_dir / "comparison.md",
                       (df.drop(columns="run_dir").to_markdown(index=False, floatfmt=".4f") + "\n").encode())
    figures.plot_risk_coverage(curves, out_dir / "figures" / "comparison" / "risk_coverage.png")
    write_json(out_dir / "metrics" / "comparison.json", {"split": split, "runs": rows, "data": dm.summary()})
    build_run_report(out_dir, title="medtrust run comparison")
    log.info(f"comparison written to {out_dir}\n{df.drop(columns='run_dir').to_string(index=False)}")
    return {"runs": rows}
