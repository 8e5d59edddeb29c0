"""Evaluate a classifier on one split: metrics of every uncertainty method before and after
temperature scaling, predictions with uncertainty, trust quadrants, failure cases and figures.
Used at the end of ``train.py`` and by ``evaluate.py``."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from medtrust.evaluation.config import evaluation_config, fit_split, plain, to_plain
from medtrust.metrics.classification import (
    compute_classification_metrics,
    fit_temperature,
    predictive_uncertainty,
    risk_coverage,
)
from medtrust.metrics.stability import stability_vs_uncertainty
from medtrust.metrics.stats import bootstrap_ci
from medtrust.metrics.subgroups import attribute_frame, classification_subgroups, write_subgroup_csvs
from medtrust.report import figures
from medtrust.tasks.base import EvalResult
from medtrust.utils.io import read_json, write_csv, write_json
from medtrust.utils.logging import get_logger
from medtrust.utils.names import safe_filename
from medtrust.xai.perturb import active_dropout_modules

log = get_logger(__name__)

QUADRANTS = ("correct_confident", "correct_uncertain", "incorrect_confident", "incorrect_uncertain")
CALIBRATION_FILE = "calibration.json"
CAL_PREDICTIONS_FILE = "calibration_predictions.csv"   # every method's probabilities on the calibration split
# the scalar metrics of a method, in files and the comparison table
SCALARS = ("auroc", "accuracy", "f1", "pr_auc", "ece_top_label", "ece_top_label_adaptive", "ece_positive", "brier",
           "nll", "aurc")


@torch.inference_mode()
def collect(task: torch.nn.Module, datamodule: Any, split: str, seed: int = 0) -> dict[str, Any]:
    """Member logits (M×N×C), MC-dropout logits (T×N×C or None), pooled features of every member
    (M×N×F, for the OOD detectors), labels (N or None) and the records of ``split``.

    The MC-dropout masks come from ``seed`` (the global RNG is forked and restored), so train.py's
    final evaluation and a later evaluate.py give the same numbers.
    """
    from medtrust.evaluation.ood import collect_outputs

    out = collect_outputs(task, datamodule.dataloader(split), seed)
    out["records"] = datamodule.load_split(split)[2]
    return out


def method_logits(task: torch.nn.Module, coll: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """S×N×C logits of each available uncertainty method (MC dropout only with a dropout p > 0)."""
    out = {"deterministic": coll["member_logits"][:1]}
    if coll["mc_logits"] is not None and active_dropout_modules(task):
        out["mc_dropout"] = coll["mc_logits"]
    if coll["member_logits"].shape[0] > 1:
        out["ensemble"] = coll["member_logits"]
    return out


def primary_method(available: Mapping[str, Any], preferred: str) -> str:
    """``auto`` picks the ensemble, else MC dropout, else the deterministic model."""
    if preferred != "auto":
        if preferred not in available:
            raise ValueError(f"evaluation.uncertainty_method={preferred!r} is not available for this run; "
                             f"available: {list(available)}")
        return preferred
    return next(m for m in ("ensemble", "mc_dropout", "deterministic") if m in available)


def probs_of(samples: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over samples of ``softmax(logits / T)``: S×N×C logits -> N×C probabilities."""
    return torch.softmax(samples.double() / temperature, -1).mean(0).float()


def choose_quadrant_threshold(conf: torch.Tensor, correct: torch.Tensor, target_accuracy: float) -> float:
    """Smallest confidence threshold whose kept (>= threshold) predictions reach
    ``target_accuracy``; the median confidence when none does."""
    order = conf.argsort(descending=True, stable=True)
    acc = correct[order].double().cumsum(0) / torch.arange(1, len(order) + 1)
    ok = (acc >= target_accuracy).nonzero()
    if len(ok) == 0:
        return float(conf.median())
    return float(conf[order][int(ok[-1])])


def check_classes(labels: Sequence[int], split: str, what: str, source: str) -> None:
    """Refuse a split whose labels hold fewer than two classes for ``what`` (AUROC, a temperature, a threshold
    fitted on one class is undefined or degenerate: temperature scaling drives T to its bound).

    Raises:
        DataError: naming the source, the split, the class it holds and what needs two.
    """
    from medtrust.data.records import DataError

    present = sorted({int(v) for v in labels})
    if len(present) < 2:
        held = f"only class {present[0]}" if present else "no labelled image"
        raise DataError(f"{source}: split {split!r} holds {held} ({len(labels)} images); {what} needs at least two "
                        "classes (change data.splits.seed / fractions, or the split column of the manifest)")


def check_training_splits(datamodule: Any, evaluation: Any = None) -> None:
    """Before training: the validation split (its AUROC may choose the checkpoint) and the calibration split
    (temperature, quadrant threshold) each hold two classes, so neither is fitted or chosen on one class."""
    c = evaluation_config("classification", evaluation)
    src = datamodule.source.describe()
    for split, what in (("val", "the validation AUROC (and the checkpoint chosen on it)"),
                        (calibration_split(datamodule, str(c.calibration_split)),
                         "temperature scaling and the trust-quadrant threshold")):
        labels = [r["label"] for r in datamodule.load_split(split)[2] if r.get("label") is not None]
        if labels:
            check_classes(labels, split, what, src)


def calibration_split(datamodule: Any, choice: str) -> str:
    """Split that temperature scaling and the quadrant threshold are fitted on (see :func:`fit_split`)."""
    return fit_split(datamodule, choice, "evaluation.calibration_split")


def fit_calibration(task: torch.nn.Module, datamodule: Any, run_dir: str | Path, cfg: Any = None) -> dict[str, Any]:
    """Fit one temperature per uncertainty method (LBFGS on NLL) and the trust-quadrant confidence
    threshold on the calibration split (``cal`` by default, carved from the training patients);
    write ``calibration.json``."""
    c = evaluation_config("classification", cfg)
    split = calibration_split(datamodule, str(c.calibration_split))
    if split == "val":
        log.warning("temperature and quadrant threshold are fitted on val, which also chose the checkpoint: "
                    "val figures after scaling are in-sample (data.splits.calibration_fraction > 0 avoids it)")
    coll = collect(task, datamodule, split, int(c.mc_seed))
    if coll["labels"] is None:
        raise ValueError(f"temperature scaling needs labelled images in split {split!r}")
    labels = coll["labels"]
    check_classes(labels.tolist(), split, "temperature scaling and the trust-quadrant threshold",
                  datamodule.source.describe())
    methods = method_logits(task, coll)
    temps = {m: fit_temperature(s, labels) for m, s in methods.items()}
    primary = primary_method(methods, str(c.uncertainty_method))
    t = temps[primary] if c.calibrate else 1.0
    probs = probs_of(methods[primary], t)
    conf, pred = probs.max(1)
    thr = c.quadrant_threshold
    thr = choose_quadrant_threshold(conf, pred == labels, float(c.quadrant_target_accuracy)) \
        if thr in (None, "auto") else float(thr)
    out = {"fitted_on": split, "n_images": len(labels), "temperatures": temps, "primary_method": primary,
           "calibrated": bool(c.calibrate), "quadrant_threshold": thr,
           "quadrant_target_accuracy": float(c.quadrant_target_accuracy)}
    # what conformal prediction fits at evaluation (any alpha): every method's probabilities on this split
    cal_df = pd.DataFrame({"id": [r["id"] for r in coll["records"]], "label": labels.numpy()})
    for m, smp in methods.items():
        for scaled, tt in (("raw", 1.0), ("scaled", temps[m])):
            p = probs_of(smp, tt)
            for k in range(p.shape[1]):
                cal_df[f"{m}/{scaled}/p{k}"] = p[:, k].numpy()
    write_csv(Path(run_dir) / CAL_PREDICTIONS_FILE, cal_df)
    out["ood"] = fit_ood(task, datamodule, run_dir, c, coll)
    write_json(Path(run_dir) / CALIBRATION_FILE, out)
    log.info(f"calibration on {split} ({len(labels)} images): temperatures {temps}, primary {primary}, quadrant threshold {thr:.3f}")
    return {**out, "dir": str(Path(run_dir).resolve())}


def recalibration_block(c: Any, fitted: Mapping[str, Any], methods: Mapping[str, torch.Tensor], labels: torch.Tensor,
                        method_rows: list[dict[str, Any]], split: str) -> dict[str, Any]:
    """Every method without recalibration, with its temperature and with each netcal recalibrator (fitted on
    the calibration split's unscaled probabilities, ``calibration_predictions.csv``) on ``split``."""
    from medtrust.evaluation.shift import METRICS, fit_recalibrators, recalibrated_rows

    if not list(c.get("recalibration") or []):
        return {}
    path = Path(cal_in_dir(fitted)) / CAL_PREDICTIONS_FILE
    if not fitted.get("dir") or not path.is_file():
        return {"unavailable": f"no {CAL_PREDICTIONS_FILE} in the run: evaluate.py ... refit=true"}
    recal = fit_recalibrators(pd.read_csv(path), c)
    out = [{"method": r["method"], "recalibration": "temperature" if r["temperature_scaled"] else "none",
            **{k: r.get(k) for k in METRICS}} for r in method_rows]
    for name, smp in methods.items():
        if name in recal:
            out += [{"method": name, **r} for r in recalibrated_rows(smp, labels, recal[name], int(c.calibration_bins))]
    fitted_on = fitted.get("fitted_on")
    return {"fitted_on": f"{fitted_on} (unscaled probabilities, {CAL_PREDICTIONS_FILE})", "reported_on": split,
            "in_sample": fitted_on == split, "rows": out}


def cal_in_dir(calibration: Mapping[str, Any] | None) -> str:
    return str((calibration or {}).get("dir") or "")


def em_correction(fitted: Mapping[str, Any], unc: dict[str, torch.Tensor], labels: torch.Tensor | None, n_bins: int,
                  split: str) -> dict[str, Any]:
    """Replace ``unc["mean"]`` by the posteriors EM-adjusted to the priors it estimates on ``split``'s
    predictions (Saerens et al. 2002); the source priors are the calibration split's class shares."""
    from medtrust.evaluation.shift import source_prior
    from medtrust.metrics.label_shift import em_priors

    path = Path(str(fitted.get("dir", ""))) / CAL_PREDICTIONS_FILE
    if not fitted.get("dir") or not path.is_file():
        raise ValueError(f"shift.label_shift=em needs the run's {CAL_PREDICTIONS_FILE} (its class priors): "
                         "evaluate.py ... refit=true writes it")
    before = unc["mean"]
    src = source_prior(pd.read_csv(path), before.shape[1])
    em = em_priors(before.numpy(), src)
    unc["mean"] = torch.from_numpy(em["probs"])
    out: dict[str, Any] = {"method": "EM (Saerens et al. 2002)", "source_prior": src.tolist(),
                           "source": f"class shares of the calibration split ({fitted.get('fitted_on')})",
                           "estimated_prior": em["prior"].tolist(), "iterations": em["iterations"],
                           "converged": em["converged"], "applied_to": f"{split}: the reported probabilities"}
    if labels is not None:
        out["true_prior"] = (torch.bincount(labels, minlength=before.shape[1]).double() / len(labels)).tolist()
        out["before"] = _scalars(compute_classification_metrics(before.float(), labels, n_bins))
    log.info(f"{split}: EM label-shift correction, priors {src.round(3).tolist()} -> {em['prior'].round(3).tolist()}")
    return out


def fit_ood(task: torch.nn.Module, datamodule: Any, run_dir: str | Path, c: Any, cal: Mapping[str, Any]) -> dict[str, Any]:
    """The OOD detectors' training features (``ood_fit.safetensors``) and their flag thresholds on the
    calibration split ``cal`` (each keeps ``ood.keep_in_distribution`` of its images)."""
    from medtrust.evaluation.ood import Detectors, collect_outputs, fit_state, save_state, thresholds

    o = c.ood
    keep = float(o.keep_in_distribution)
    if not 0 < keep < 1:
        raise ValueError(f"evaluation.ood.keep_in_distribution must lie in (0, 1), got {keep}")
    train = collect_outputs(task, datamodule.dataloader("train"), int(c.mc_seed))
    state = fit_state(train, int(o.max_fit_images), int(c.mc_seed))
    det = Detectors(list(o.detectors), state, int(o.knn_k))
    ref = det.layer_reference(cal)
    state.update(ref)
    det.ref = {k.removeprefix("ref/"): v for k, v in ref.items()}
    save_state(run_dir, state)
    return {"features_from": f"train ({len(state['labels'])} of {len(train['labels'])} images)",
            "thresholds": thresholds(det.scores(cal), keep), "keep_in_distribution": keep,
            "thresholds_fitted_on": f"{calibration_split(datamodule, str(c.calibration_split))} "
                                    f"({len(cal['member_logits'][0])} images)",
            "knn_k": int(o.knn_k)}


def load_calibration(run_dir: str | Path) -> dict[str, Any] | None:
    """``calibration.json`` with the folder it was read from (``dir``: where the calibration
    predictions and the OOD features are), or None."""
    p = Path(run_dir) / CALIBRATION_FILE
    return {**read_json(p), "dir": str(Path(run_dir).resolve())} if p.is_file() else None


def conformal_block(c: Any, fitted: Mapping[str, Any], method: str, scaled: bool, probs: torch.Tensor,
                    labels: torch.Tensor | None, split: str) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Split-conformal sets of the evaluated images at ``conformal.alpha``, fitted on the calibration
    split's probabilities of the same method and scaling; ``(summary, {column: sets})``.

    Raises:
        ValueError: alpha outside (0, 1); a calibration split too small for alpha.
    """
    from medtrust.metrics import conformal as cp

    cc = c.conformal
    alpha = cp.check_alpha(cc.alpha, "evaluation.conformal.alpha")
    path = Path(str(fitted.get("dir", ""))) / CAL_PREDICTIONS_FILE
    if not fitted.get("dir") or not path.is_file():
        return {"unavailable": f"no {CAL_PREDICTIONS_FILE} in the run (written after training since issue 16): "
                               "evaluate.py ... refit=true fits it"}, {}
    cal = pd.read_csv(path)
    cols = [f"{method}/{'scaled' if scaled else 'raw'}/p{k}" for k in range(probs.shape[1])]
    missing = [col for col in cols if col not in cal.columns]
    if missing:
        raise ValueError(f"{path}: columns {missing} missing (expected the calibration probabilities of {method})")
    pc, yc = cal[cols].to_numpy(), cal["label"].to_numpy().astype(int)
    try:
        cp.check_calibration_size(len(yc), alpha, f"evaluation.conformal on {path}")
    except ValueError as err:  # evaluate.py stops on it; train.py keeps the run and reports it
        log.warning(str(err))
        return {"refused": str(err)}, {}
    fitted_on = fitted.get("fitted_on")
    out: dict[str, Any] = {"alpha": alpha, "target_coverage": 1 - alpha, "fitted_on": f"{fitted_on} ({len(yc)} images)",
                           "reported_on": split, "in_sample": fitted_on == split, "probabilities": f"{method}, "
                           f"{'temperature-scaled (the temperature was fitted on the same calibration images)' if scaled else 'unscaled'}",
                           "methods": {}}
    columns = {}
    for i, m in enumerate(cc.methods):
        kw = {"k_reg": int(cc.raps_k_reg), "lam": float(cc.raps_lambda)}
        q = cp.fit_sets(pc, yc, alpha, str(m), seed=int(c.mc_seed) + i, **kw)
        sets = cp.predict_sets(probs.double().numpy(), q, str(m), seed=int(c.mc_seed) + 100 + i, **kw)
        row: dict[str, Any] = {"quantile": q, "mean_size": float(sets.sum(1).mean())}
        if labels is not None:
            row.update(cp.set_summary(sets, labels.numpy()))
        out["methods"][str(m)] = row
        columns[f"set_{m}"] = cp.set_strings(sets)
    return out, columns


def ood_flags(c: Any, fitted: Mapping[str, Any], coll: Mapping[str, Any]) -> tuple[dict[str, Any], np.ndarray | None]:
    """The flag detector's score per image and its flag at the threshold fitted after training."""
    from medtrust.evaluation.ood import Detectors, load_state

    o = fitted.get("ood") or {}
    if not o or not fitted.get("dir"):
        return {"unavailable": "no OOD fit in the run (written after training since issue 16): evaluate.py ... "
                               "refit=true fits it"}, None
    state = load_state(fitted["dir"])
    det = Detectors(list(c.ood.detectors), state, int(o.get("knn_k", c.ood.knn_k)))
    names = [n for n in det.available(coll) if n in o["thresholds"]]
    if not names:
        return {"unavailable": "none of evaluation.ood.detectors was fitted for this run"}, None
    name = str(c.ood.flag_detector) if str(c.ood.flag_detector) in names else names[0]
    det.names = [name]
    score = det.scores(coll)[name]
    thr = float(o["thresholds"][name])
    return {"detector": name, "threshold": thr, "keep_in_distribution": o.get("keep_in_distribution"),
            "threshold_fitted_on": o.get("thresholds_fitted_on"), "features_from": o.get("features_from"),
            "flagged": float((score > thr).mean())}, score


def _quadrant(correct: bool, confident: bool) -> str:
    return f"{'correct' if correct else 'incorrect'}_{'confident' if confident else 'uncertain'}"


def _scalars(m: Mapping[str, Any]) -> dict[str, Any]:
    return {k: m[k] for k in SCALARS if k in m}


def evaluate_classification(task: torch.nn.Module, datamodule: Any, split: str, out_dir: str | Path,
                            cfg: Any = None, extra: Mapping[str, Any] | None = None,
                            calibration: Mapping[str, Any] | None = None) -> EvalResult:
    """Write ``metrics/<split>.json``, ``<split>_predictions.csv``, ``metrics/<split>_methods.csv``,
    failure cases and figures; without labels only predictions are written.

    Args:
        calibration: what post-fit fitted (``calibration.json``): temperatures, primary method,
            quadrant threshold and the split they were fitted on. Figures after scaling on that same
            split are marked in-sample (``metrics["in_sample"]``).
    """
    c = evaluation_config("classification", cfg)
    out_dir = Path(out_dir)
    n_bins = int(c.calibration_bins)
    sh = c.get("shift") or {}
    shift_info: dict[str, Any] = {}
    if (sh.get("adapt_bn") or sh.get("label_shift")) and all(r.get("label") is not None
                                                            for r in datamodule.load_split(split)[2]):
        # alone and together, every method: the same images as trained, with adapted BN, with EM priors
        from medtrust.evaluation.shift import score_condition

        path = Path(str(cal_in_dir(calibration))) / CAL_PREDICTIONS_FILE
        cal_df = pd.read_csv(path) if path.is_file() else None
        labels_ = torch.tensor([r["label"] for r in datamodule.load_split(split)[2]], dtype=torch.long)
        shift_info["variants"] = score_condition(task, datamodule.dataloader(split), labels_, c, dict(calibration or {}),
                                                 cal_df, {"adapt_bn": sh.get("adapt_bn"),
                                                          "label_shift": sh.get("label_shift")}, int(c.mc_seed))
    if sh.get("adapt_bn"):  # test-time adaptation: batch-norm statistics of the evaluated images (labels unused)
        from medtrust.evaluation.shift import adapt_bn

        task, n_bn = adapt_bn(task, datamodule.dataloader(split))
        shift_info["adapt_bn"] = {"batchnorm_layers": n_bn, "adapted_on": f"{split} (its images, no labels)"}
        log.info(f"{split}: batch-norm statistics of {n_bn} layers re-estimated on its images")
    coll = collect(task, datamodule, split, int(c.mc_seed))
    methods = method_logits(task, coll)
    cal_in = dict(calibration or {})
    temps = dict(cal_in.get("temperatures", {}))
    primary = cal_in.get("primary_method") or primary_method(methods, str(c.uncertainty_method))
    if c.uncertainty_method != "auto" or primary not in methods:
        primary = primary_method(methods, str(c.uncertainty_method))
    t = float(temps.get(primary, 1.0)) if c.calibrate else 1.0
    unc = predictive_uncertainty(torch.softmax(methods[primary].double() / t, -1))
    labels, recs = coll["labels"], coll["records"]
    if sh.get("label_shift") == "em":
        shift_info["label_shift"] = em_correction(cal_in, unc, labels, n_bins, split)
    elif sh.get("label_shift") not in (None, "none"):
        raise ValueError(f"shift.label_shift must be em or null, got {sh.get('label_shift')!r}")
    probs = unc["mean"].float()
    conf, pred = probs.max(1)
    thr = float(cal_in.get("quadrant_threshold", 0.5 if c.quadrant_threshold == "auto" else c.quadrant_threshold))
    fitted_on = cal_in.get("fitted_on") if cal_in else None
    in_sample = fitted_on == split
    calib = {"method": primary, "temperature": t, "scaled": bool(c.calibrate and primary in temps),
             "fitted_on": fitted_on, "n_fitted_images": cal_in.get("n_images"), "reported_on": split,
             "in_sample": in_sample, "quadrant_threshold": thr}
    pred_df = pd.DataFrame({
        "id": [r["id"] for r in recs], "path": [r.get("path") for r in recs],
        "patient_id": [r["patient_id"] for r in recs],
        **{f"prob_{k}": probs[:, k].numpy() for k in range(probs.shape[1])},
        "pred": pred.numpy(), "confidence": conf.numpy(),
        **{k: unc[k].float().numpy() for k in ("entropy", "expected_entropy", "mutual_information", "variance")},
        "method": primary, "temperature": t,
    })
    conformal, set_cols = conformal_block(c, cal_in, primary, bool(c.calibrate and primary in temps), probs, labels, split)
    for col, v in set_cols.items():
        pred_df[col] = v
    ood, ood_score = ood_flags(c, cal_in, coll)
    if ood_score is not None:
        pred_df["ood_score"] = ood_score
        pred_df["ood_flag"] = ood_score > ood["threshold"]
    result: dict[str, Any] = {"split": split, "task": task.task_name, "metric_group": task.metric_group,
                              "conformal": conformal, "ood_flag": ood, **({"shift": shift_info} if shift_info else {}),
                              **({"refused": [conformal["refused"]]} if "refused" in conformal else {}),
                              "metric_groups": ["cls", "cal"], "n_images": len(recs), "n_classes": int(probs.shape[1]),
                              "method": primary, "temperature": t, "calibration": calib,
                              "in_sample": (["cls", "cal", "quadrants"] if in_sample else []),
                              "data": datamodule.summary(), "trust_thresholds": plain(c.trust), **dict(extra or {})}
    mdir = out_dir / "metrics"
    pred_path = out_dir / f"{split}_predictions.csv"
    tables = {"predictions": pred_path}
    if labels is None:  # unlabelled images: predictions only
        write_csv(pred_path, pred_df)
        result.update({"labelled": False, "metric_groups": [], "tables": {"predictions": str(pred_path)}})
        write_json(mdir / f"{split}.json", result)
        return EvalResult(split, task.task_name, task.metric_group, result, tables, [])
    if in_sample:
        log.warning(f"{split}: temperature and quadrant threshold were fitted on this split: figures after scaling "
                    "are in-sample")
    present = sorted(set(labels.tolist()))
    if len(present) < 2:
        msg = (f"{split}: every image is class {present[0]}: AUROC and PR-AUC are undefined (null); accuracy, ECE, "
               "Brier and NLL are reported")
        log.warning(msg)
        result["undefined"] = [msg]

    sub_cfg = c.subgroups
    attrs = attribute_frame(recs, to_plain(sub_cfg.attributes))
    attrs.columns = [a if a not in pred_df.columns and a not in ("label", "correct", "quadrant") else f"attr_{a}"
                     for a in attrs.columns]
    pred_df = pd.concat([pred_df, attrs], axis=1)
    correct = pred == labels
    confident = conf >= thr
    pred_df.insert(3, "label", labels.numpy())
    pred_df["correct"] = correct.numpy()
    pred_df["quadrant"] = [_quadrant(bool(a), bool(b)) for a, b in zip(correct, confident)]

    rows = []
    for name, s in methods.items():
        for scaled in (False, True):
            if scaled and name not in temps:
                continue
            tt = float(temps.get(name, 1.0)) if scaled else 1.0
            m = compute_classification_metrics(probs_of(s, tt), labels, n_bins)
            rows.append({"method": name, "temperature_scaled": scaled, "temperature": tt,
                         "fitted_on": fitted_on if scaled else None, "in_sample": bool(scaled and in_sample),
                         **{k: v for k, v in m.items() if k != "reliability"}})
    tables["methods"] = mdir / f"{split}_methods.csv"
    write_csv(tables["methods"], pd.DataFrame(rows))
    recal = recalibration_block(c, cal_in, methods, labels, rows, split)
    if recal.get("rows"):
        tables["recalibration"] = mdir / f"{split}_recalibration.csv"
        write_csv(tables["recalibration"], pd.DataFrame(recal["rows"]))
    cls = compute_classification_metrics(probs, labels, n_bins)
    uncal = compute_classification_metrics(probs_of(methods[primary], 1.0), labels, n_bins)
    cis = _cis(probs, labels, n_bins, int(c.bootstrap))
    counts = pred_df["quadrant"].value_counts().reindex(QUADRANTS, fill_value=0).astype(int).to_dict()
    quadrants: dict[str, Any] = {"confidence_threshold": thr, "threshold_fitted_on": fitted_on, "counts": counts}
    samples = int(c.explanation_stability_samples)
    if samples > 0 and active_dropout_modules(task):
        stab = explanation_stability(task, datamodule, split, pred_df["pred"].to_numpy(), samples,
                                     c.explanation_stability_layer, int(c.mc_seed))
        st_thr = float(c.explanation_stability_threshold)
        pred_df["explanation_stability"] = stab
        stable = np.where(np.isfinite(stab), np.where(stab >= st_thr, "stable", "unstable"), "undefined")
        pred_df["quadrant_stability"] = [f"{q}_{s}" for q, s in zip(pred_df["quadrant"], stable)]
        quadrants["stability"] = {
            "method": "gradcam under MC dropout (mean Spearman with the deterministic map)",
            "samples": samples, "threshold": st_thr,
            "mean": float(np.nanmean(stab)) if np.isfinite(stab).any() else None,
            "ci95": bootstrap_ci(lambda v: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan"),
                                 torch.as_tensor(stab), n_boot=int(c.bootstrap)) if int(c.bootstrap) > 0 else None,
            "counts": {f"{q}_{s}": int((pred_df["quadrant_stability"] == f"{q}_{s}").sum())
                       for q in QUADRANTS for s in ("stable", "unstable", "undefined")},
            "vs_uncertainty_and_correctness": stability_vs_uncertainty(stab, pred_df["entropy"].to_numpy(),
                                                                       pred_df["correct"].to_numpy()),
        }
    elif samples > 0:
        quadrants["stability"] = {"undefined": f"no dropout module with p > 0 in {type(task).__name__}: MC-dropout "
                                               "explanation stability is undefined (every pass would be identical)"}
    write_csv(pred_path, pred_df)
    result.update({
        "cls": _scalars(cls), "cls_uncalibrated": _scalars(uncal), "ci95": cis,
        "cal": {k: cls[k] for k in ("ece_top_label", "ece_positive", "brier") if k in cls} | {"reliability": cls["reliability"]},
        "methods": rows, "quadrants": quadrants, "recalibration": recal,
    })
    if len(attrs.columns):
        result["subgroups"] = classification_subgroups(pred_df, list(attrs.columns), probs.shape[1],
                                                       int(sub_cfg.min_group_size), int(sub_cfg.bootstrap),
                                                       int(c.mc_seed))
        for p in write_subgroup_csvs(result["subgroups"], mdir, split):
            tables[Path(p).stem.removeprefix(f"{split}_")] = Path(p)
    fails = export_failure_cases(datamodule, split, pred_df, out_dir / "failure_cases", int(c.n_failure_cases))
    result["failure_cases"] = fails
    figs: list[Path] = []
    if c.figures:
        figs = _figures(datamodule, split, methods, temps, labels, probs, uncal, cls, unc, correct, pred_df,
                        out_dir / "figures" / split)
        result["figures"] = [str(p) for p in figs]
    result["tables"] = {k: str(v) for k, v in tables.items()}
    write_json(mdir / f"{split}.json", result)
    log.info(f"{split} [{primary}, T={t:.3f}{', in-sample' if in_sample else ''}]: AUROC {cls['auroc']:.4f}, "
             f"acc {cls['accuracy']:.4f}, top-label ECE {uncal['ece_top_label']:.4f} -> {cls['ece_top_label']:.4f}, "
             f"Brier {uncal['brier']:.4f} -> {cls['brier']:.4f}")
    return EvalResult(split, task.task_name, task.metric_group, result, tables, figs)


def _cis(probs: torch.Tensor, labels: torch.Tensor, n_bins: int, n_boot: int) -> dict[str, Any]:
    """BCa bootstrap 95 % CIs (over images) of the reported top-label ECE, AUROC and accuracy; each
    resample computes only its own metric (the whole metric set per resample costs 10-25x more)."""
    if n_boot <= 0 or len(labels) < 2:
        return {}
    from torchmetrics.functional.classification import binary_auroc, multiclass_auroc

    from medtrust.metrics.calibration import calibration_bins, ece_from_bins

    conf, pred = probs.max(1)
    correct = (pred == labels).double()
    c = probs.shape[1]

    def auroc(p: torch.Tensor, y: torch.Tensor) -> float:
        if y.unique().numel() < 2:
            return float("nan")
        return float(binary_auroc(p[:, 1], y) if c == 2 else multiclass_auroc(p, y, num_classes=c))

    return {"ece_top_label": bootstrap_ci(lambda cf, ok: ece_from_bins(calibration_bins(cf, ok, n_bins))["ece"],
                                          conf, correct, n_boot=n_boot),
            "auroc": bootstrap_ci(auroc, probs, labels, n_boot=n_boot),
            "accuracy": bootstrap_ci(lambda ok: float(ok.mean()), correct, n_boot=n_boot)}


def explanation_stability(task: torch.nn.Module, dm: Any, split: str, pred: np.ndarray, samples: int,
                          layer: Any = "auto", seed: int = 0) -> np.ndarray:
    """Per-image stability of the Grad-CAM map of the predicted class under ``samples`` MC-dropout
    passes: mean Spearman correlation of each pass's map with the deterministic map (NaN where
    undefined, e.g. an all-zero map)."""
    from medtrust.metrics.stability import map_stability
    from medtrust.xai.methods import ExplainInputs, GradCAM
    from medtrust.xai.perturb import mc_dropout_maps
    from medtrust.xai.targets import Target

    method = GradCAM(layers=layer if layer in (None, "auto") else [layer])
    out, start = [], 0
    was = task.training
    task.eval()
    try:
        with torch.enable_grad():
            for batch in dm.dataloader(split):
                images = batch["image"].to(next(task.parameters()).device)
                cls = torch.as_tensor(pred[start:start + len(images)], dtype=torch.long)
                start += len(images)
                x = ExplainInputs(task, images, Target(task, "class_logit", cls), seed=seed)
                ref = method(x)
                name = next(iter(ref))
                maps = mc_dropout_maps(method, x, samples)[name]
                out += [map_stability(maps[:, b].numpy(), ref[name][b].detach().cpu().numpy())["spearman"]
                        for b in range(len(images))]
    finally:
        task.train(was)
    return np.asarray(out, dtype=float)


def export_failure_cases(dm: Any, split: str, df: pd.DataFrame, folder: Path, k: int) -> dict[str, int]:
    """Most confident errors and most uncertain correct predictions of ``split``:
    ``<folder>/<split>/<kind>/<rank>_<id>.png`` and ``<folder>/<split>/index.csv`` (one folder per
    split, so val and test cases never mix)."""
    folder = folder / split
    folder.mkdir(parents=True, exist_ok=True)
    picks = {
        "confident_errors": df[~df["correct"]].sort_values("confidence", ascending=False).head(k),
        "uncertain_correct": df[df["correct"]].sort_values("entropy", ascending=False).head(k),
    }
    index = []
    for name, sub in picks.items():
        (folder / name).mkdir(exist_ok=True)
        for rank, (i, row) in enumerate(sub.iterrows()):
            img = (dm.raw_image(split, int(i)) * 255).astype(np.uint8)
            fname = f"{rank:02d}_{safe_filename(str(row['id']))}.png"
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(folder / name / fname)
            index.append({"kind": name, "file": f"{name}/{fname}", "id": row["id"], "path": row["path"],
                          "label": int(row["label"]), "pred": int(row["pred"]), "confidence": float(row["confidence"]),
                          "entropy": float(row["entropy"]), "mutual_information": float(row["mutual_information"]),
                          **({"explanation_stability": float(row["explanation_stability"])}
                             if "explanation_stability" in row else {})})
    write_csv(folder / "index.csv", pd.DataFrame(index, columns=None if index else ["kind", "file", "id"]))
    return {name: len(sub) for name, sub in picks.items()}


def _figures(dm, split, methods, temps, labels, probs, uncal, cls, unc, correct, df, fig_dir: Path) -> list[Path]:
    paths = [figures.plot_reliability(uncal["reliability"], fig_dir / "reliability_uncalibrated.png",
                                      uncal["ece_top_label"], what="images, top-label, before TS"),
             figures.plot_reliability(cls["reliability"], fig_dir / "reliability.png", cls["ece_top_label"],
                                      what="images, top-label, as reported")]
    curves = {}
    for name, s in methods.items():
        p = probs_of(s, float(temps.get(name, 1.0)))
        cf, pr = p.max(1)
        cov, risk = risk_coverage(cf, pr == labels)
        curves[name] = (cov.numpy(), risk.numpy())
    paths.append(figures.plot_risk_coverage(curves, fig_dir / "risk_coverage.png"))
    ok = correct.numpy().astype(bool)
    paths.append(figures.plot_uncertainty_hist(
        {"predictive entropy": unc["entropy"].numpy(), "mutual information": unc["mutual_information"].numpy(),
         "1 - confidence": 1 - probs.max(1).values.numpy()}, ok, fig_dir / "uncertainty_hist.png"))
    groups = {}
    for q in QUADRANTS:
        sub = df[df["quadrant"] == q].head(5)
        groups[f"{q} ({int((df['quadrant'] == q).sum())})"] = [
            (dm.raw_image(split, int(i)), f"y={int(r['label'])} pred={int(r['pred'])} p={r['confidence']:.2f}")
            for i, r in sub.iterrows()]
    paths.append(figures.plot_image_grid(groups, fig_dir / "trust_quadrants.png", "trust quadrants (examples)"))
    return [Path(p) for p in paths]


def compare_classifiers(runs: Sequence[Any], datamodule: Any, split: str, out_dir: Path, cfg: Any = None) -> list[dict[str, Any]]:
    """Classifier runs on the same images: each with its own primary uncertainty method and the
    temperature it fitted (calibration.json): AUROC, accuracy, ECEs, Brier, NLL, AURC, plus their
    risk-coverage curves in one figure."""
    c = evaluation_config("classification", cfg)
    rows, curves = [], {}
    for r in runs:
        cal = r.fitted or {}
        coll = collect(r.task, datamodule, split, int(c.mc_seed))
        if coll["labels"] is None:
            raise ValueError(f"comparing classifiers needs labelled images in split {split!r}")
        methods = method_logits(r.task, coll)
        primary = cal.get("primary_method") or primary_method(methods, str(c.uncertainty_method))
        t = float(cal.get("temperatures", {}).get(primary, 1.0))
        probs = probs_of(methods[primary], t)
        m = compute_classification_metrics(probs, coll["labels"], int(c.calibration_bins))
        rows.append({"run": r.label, "run_dir": str(r.run_dir), "method": primary, "temperature": t,
                     "temperature_fitted_on": cal.get("fitted_on"), **_scalars(m)})
        conf, pred = probs.max(1)
        cov, risk = risk_coverage(conf, pred == coll["labels"])
        curves[r.label] = (cov.numpy(), risk.numpy())
    figures.plot_risk_coverage(curves, Path(out_dir) / "figures" / "comparison" / "risk_coverage.png")
    return rows
