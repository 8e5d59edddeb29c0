"""Evaluate a classifier on one split: metrics of every uncertainty method before and after
temperature scaling, predictions with uncertainty, trust quadrants, failure cases and figures.
Used at the end of ``train.py`` and by ``evaluate.py``."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from medtrust.metrics.classification import (
    compute_classification_metrics,
    fit_temperature,
    predictive_uncertainty,
    risk_coverage,
)
from medtrust.metrics.stats import bootstrap_ci
from medtrust.metrics.stability import stability_vs_uncertainty
from medtrust.metrics.subgroups import (
    SUBGROUP_DEFAULTS,
    attribute_frame,
    classification_subgroups,
    write_subgroup_csvs,
)
from medtrust.report import figures
from medtrust.xai.perturb import dropout_modules
from medtrust.utils.io import write_json
from medtrust.utils.logging import get_logger

log = get_logger(__name__)

DEFAULTS: dict[str, Any] = {
    "subgroups": SUBGROUP_DEFAULTS,   # per-group metrics and gaps (see medtrust.metrics.subgroups)
    "calibration_bins": 15,
    "bootstrap": 1000,            # resamples for the ECE/AUROC confidence intervals
    "uncertainty_method": "auto",  # auto | deterministic | mc_dropout | ensemble
    "calibrate": True,            # apply the temperature fitted on validation
    "calibration_split": "auto",  # auto (cal when present, else val) | val | cal
    "quadrant_threshold": "auto",  # confidence threshold of the trust quadrants (auto = chosen on val)
    "quadrant_target_accuracy": 0.99,
    "n_failure_cases": 8,
    "figures": True,
    "mc_seed": 0,                 # MC-dropout masks are drawn from this seed: evaluation is reproducible
    # third trust axis: Grad-CAM stability under MC dropout (Spearman of each pass's map with the
    # deterministic map, mean over passes); 0 passes = off
    "explanation_stability_samples": 8,
    "explanation_stability_threshold": 0.9,   # stable when the mean Spearman >= this
    "explanation_stability_layer": "auto",    # Grad-CAM layer (auto = last conv stage)
}
QUADRANTS = ("correct_confident", "correct_uncertain", "incorrect_confident", "incorrect_uncertain")
CALIBRATION_FILE = "calibration.json"


def _cfg(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    return {**DEFAULTS, **{k: v for k, v in dict(cfg or {}).items() if k in DEFAULTS}}


@torch.inference_mode()
def collect(task: torch.nn.Module, datamodule: Any, split: str, seed: int = 0) -> dict[str, Any]:
    """Member logits (M×N×C), MC-dropout logits (T×N×C or None), labels (N or None), records.

    The MC-dropout masks come from ``seed`` (the global RNG is forked and restored), so train.py's
    final evaluation and a later evaluate.py give the same numbers.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _collect(task, datamodule, split)


def _collect(task: torch.nn.Module, datamodule: Any, split: str) -> dict[str, Any]:
    device = next(task.parameters()).device
    was = task.training
    task.eval()
    members, mc, labels, index = [], [], [], []
    for batch in datamodule.dataloader(split):
        out = task.predict_step({"image": batch["image"].to(device)}, 0)
        members.append(out["member_logits"].float().cpu())
        if "mc_logits" in out:
            mc.append(out["mc_logits"].float().cpu())
        if "label" in batch:
            labels.append(batch["label"])
        index.append(batch["index"])
    task.train(was)
    order = torch.cat(index).argsort()
    return {
        "member_logits": torch.cat(members, 1)[:, order],
        "mc_logits": torch.cat(mc, 1)[:, order] if mc else None,
        "labels": torch.cat(labels)[order] if labels else None,
        "records": datamodule.load_split(split)[2],
    }


def method_logits(task: torch.nn.Module, coll: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """S×N×C logits of each available uncertainty method."""
    out = {"deterministic": coll["member_logits"][:1]}
    drop = [m.p for m in task._dropout_modules(head_only=task.mc_scope == "head")] if hasattr(task, "_dropout_modules") else []
    if coll["mc_logits"] is not None and any(p > 0 for p in drop):
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
    """Smallest confidence threshold whose kept (>= threshold) validation predictions reach
    ``target_accuracy``; the median confidence when none does."""
    order = conf.argsort(descending=True, stable=True)
    acc = correct[order].double().cumsum(0) / torch.arange(1, len(order) + 1)
    ok = (acc >= target_accuracy).nonzero()
    if len(ok) == 0:
        return float(conf.median())
    return float(conf[order][int(ok[-1])])


def calibration_split(datamodule: Any, choice: str) -> str:
    """Split that temperature scaling and the quadrant threshold are fitted on: ``auto`` takes the
    carved-out calibration split ``cal`` when the data has one, else ``val``."""
    if choice == "auto":
        return "cal" if datamodule.has_split("cal") else "val"
    if choice not in ("val", "cal"):
        raise ValueError(f"evaluation.calibration_split must be auto, val or cal, got {choice!r}")
    if not datamodule.has_split(choice):
        raise ValueError(f"evaluation.calibration_split={choice} but the data has no {choice!r} split "
                         "(set data.splits.calibration_fraction > 0 to carve one from train)")
    return choice


def fit_calibration(task: torch.nn.Module, datamodule: Any, run_dir: str | Path, cfg: Any = None) -> dict[str, Any]:
    """Fit one temperature per uncertainty method (LBFGS on validation NLL) and the trust-quadrant
    confidence threshold on validation; write ``calibration.json``."""
    c = _cfg(cfg)
    split = calibration_split(datamodule, str(c["calibration_split"]))
    coll = collect(task, datamodule, split, int(c["mc_seed"]))
    if coll["labels"] is None:
        raise ValueError(f"temperature scaling needs labelled images in split {split!r}")
    labels = coll["labels"]
    methods = method_logits(task, coll)
    temps = {m: fit_temperature(s, labels) for m, s in methods.items()}
    primary = primary_method(methods, str(c["uncertainty_method"]))
    t = temps[primary] if c["calibrate"] else 1.0
    probs = probs_of(methods[primary], t)
    conf, pred = probs.max(1)
    thr = c["quadrant_threshold"]
    thr = choose_quadrant_threshold(conf, pred == labels, float(c["quadrant_target_accuracy"])) \
        if thr in (None, "auto") else float(thr)
    out = {"fitted_on": split, "n_images": len(labels), "temperatures": temps, "primary_method": primary,
           "calibrated": bool(c["calibrate"]), "quadrant_threshold": thr,
           "quadrant_target_accuracy": float(c["quadrant_target_accuracy"])}
    write_json(Path(run_dir) / CALIBRATION_FILE, out)
    log.info(f"calibration on {split} ({len(labels)} images): temperatures {temps}, primary {primary}, quadrant threshold {thr:.3f}")
    return out


def _quadrant(correct: bool, confident: bool) -> str:
    return f"{'correct' if correct else 'incorrect'}_{'confident' if confident else 'uncertain'}"


def evaluate_classification(task: torch.nn.Module, datamodule: Any, split: str, out_dir: str | Path,
                            cfg: Any = None, extra: Mapping[str, Any] | None = None,
                            calibration: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``metrics/<split>.json``, ``<split>_predictions.csv``, ``metrics/<split>_methods.csv``,
    failure cases and figures; without labels only predictions are written."""
    c = _cfg(cfg)
    out_dir = Path(out_dir)
    coll = collect(task, datamodule, split, int(c["mc_seed"]))
    methods = method_logits(task, coll)
    temps = dict((calibration or {}).get("temperatures", {}))
    primary = (calibration or {}).get("primary_method") or primary_method(methods, str(c["uncertainty_method"]))
    if c["uncertainty_method"] != "auto":
        primary = primary_method(methods, str(c["uncertainty_method"]))
    t = float(temps.get(primary, 1.0)) if c["calibrate"] else 1.0
    unc = predictive_uncertainty(torch.softmax(methods[primary].double() / t, -1))
    probs = unc["mean"].float()
    conf, pred = probs.max(1)
    labels, recs = coll["labels"], coll["records"]
    thr = float((calibration or {}).get("quadrant_threshold", 0.5 if c["quadrant_threshold"] == "auto" else c["quadrant_threshold"]))
    pred_df = pd.DataFrame({
        "id": [r["id"] for r in recs], "path": [r.get("path") for r in recs],
        "patient_id": [r["patient_id"] for r in recs],
        **{f"prob_{k}": probs[:, k].numpy() for k in range(probs.shape[1])},
        "pred": pred.numpy(), "confidence": conf.numpy(),
        **{k: unc[k].float().numpy() for k in ("entropy", "mutual_information", "variance")},
        "method": primary, "temperature": t,
    })
    result: dict[str, Any] = {"split": split, "task": "classification", "n_images": len(recs),
                              "method": primary, "temperature": t, "data": datamodule.summary(), **dict(extra or {})}
    mdir = out_dir / "metrics"
    mdir.mkdir(parents=True, exist_ok=True)
    if labels is None:  # unlabelled images: predictions only
        pred_df.to_csv(out_dir / f"{split}_predictions.csv", index=False)
        result["labelled"] = False
        write_json(mdir / f"{split}.json", result)
        return result

    sub_cfg = {**SUBGROUP_DEFAULTS, **dict(c["subgroups"] or {})}
    attrs = attribute_frame(recs, sub_cfg["attributes"])
    attrs.columns = [a if a not in pred_df.columns and a not in ("label", "correct", "quadrant") else f"attr_{a}"
                     for a in attrs.columns]
    pred_df = pd.concat([pred_df, attrs], axis=1)
    correct = pred == labels
    confident = conf >= thr
    pred_df.insert(3, "label", labels.numpy())
    pred_df["correct"] = correct.numpy()
    pred_df["quadrant"] = [_quadrant(bool(a), bool(b)) for a, b in zip(correct, confident)]
    pred_df.to_csv(out_dir / f"{split}_predictions.csv", index=False)

    rows = []
    for name, s in methods.items():
        for scaled in (False, True):
            tt = float(temps.get(name, 1.0)) if scaled else 1.0
            if scaled and name not in temps:
                continue
            m = compute_classification_metrics(probs_of(s, tt), labels, int(c["calibration_bins"]))
            rows.append({"method": name, "temperature_scaled": scaled, "temperature": tt,
                         **{k: v for k, v in m.items() if k != "reliability"}})
    pd.DataFrame(rows).to_csv(mdir / f"{split}_methods.csv", index=False)
    cls = compute_classification_metrics(probs, labels, int(c["calibration_bins"]))
    uncal = compute_classification_metrics(probs_of(methods[primary], 1.0), labels, int(c["calibration_bins"]))

    def ece_of(p, y):
        return compute_classification_metrics(p, y, int(c["calibration_bins"]))["ece"]

    def auroc_of(p, y):
        return compute_classification_metrics(p, y, int(c["calibration_bins"]))["auroc"]

    n_boot = int(c["bootstrap"])
    cis = {"ece": bootstrap_ci(ece_of, probs, labels, n_boot=n_boot), "auroc": bootstrap_ci(auroc_of, probs, labels, n_boot=n_boot)}
    counts = pred_df["quadrant"].value_counts().reindex(QUADRANTS, fill_value=0).astype(int).to_dict()
    quadrants: dict[str, Any] = {"confidence_threshold": thr, "counts": counts}
    if int(c["explanation_stability_samples"]) > 0 and dropout_modules(task):
        stab = explanation_stability(task, datamodule, split, pred_df["pred"].to_numpy(), int(c["explanation_stability_samples"]),
                                     c["explanation_stability_layer"], int(c["mc_seed"]))
        st_thr = float(c["explanation_stability_threshold"])
        pred_df["explanation_stability"] = stab
        stable = np.where(np.isfinite(stab), np.where(stab >= st_thr, "stable", "unstable"), "undefined")
        pred_df["quadrant_stability"] = [f"{q}_{s}" for q, s in zip(pred_df["quadrant"], stable)]
        pred_df.to_csv(out_dir / f"{split}_predictions.csv", index=False)
        quadrants["stability"] = {
            "method": "gradcam under MC dropout (mean Spearman with the deterministic map)",
            "samples": int(c["explanation_stability_samples"]), "threshold": st_thr,
            "counts": {f"{q}_{s}": int((pred_df["quadrant_stability"] == f"{q}_{s}").sum())
                       for q in QUADRANTS for s in ("stable", "unstable", "undefined")},
            "vs_uncertainty_and_correctness": stability_vs_uncertainty(stab, pred_df["entropy"].to_numpy(),
                                                                       pred_df["correct"].to_numpy()),
        }
    result.update({
        "cls": {k: v for k, v in cls.items() if k != "reliability"},
        "cls_uncalibrated": {k: v for k, v in uncal.items() if k != "reliability"},
        "ci95": cis, "cal": {"ece": cls["ece"], "brier": cls["brier"], "reliability": cls["reliability"]},
        "methods": rows, "quadrants": quadrants,
    })
    if len(attrs.columns):
        result["subgroups"] = classification_subgroups(pred_df, list(attrs.columns), probs.shape[1],
                                                       int(sub_cfg["min_group_size"]), int(sub_cfg["bootstrap"]),
                                                       int(c["mc_seed"]))
        write_subgroup_csvs(result["subgroups"], mdir, split)
    fails = export_failure_cases(datamodule, split, pred_df, out_dir / "failure_cases", int(c["n_failure_cases"]))
    result["failure_cases"] = fails
    if c["figures"]:
        result["figures"] = _figures(datamodule, split, methods, temps, labels, probs, uncal, cls, unc, correct,
                                     pred_df, out_dir / "figures" / split, c)
    write_json(mdir / f"{split}.json", result)
    log.info(f"{split} [{primary}, T={t:.3f}]: AUROC {cls['auroc']:.4f}, acc {cls['accuracy']:.4f}, "
             f"ECE {uncal['ece']:.4f} -> {cls['ece']:.4f}, Brier {uncal['brier']:.4f} -> {cls['brier']:.4f}")
    return result


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


def _image(dm: Any, split: str, i: int) -> np.ndarray:
    return dm.raw_image(split, int(i))


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
            img = (_image(dm, split, i) * 255).astype(np.uint8)
            fname = f"{rank:02d}_{row['id']}.png"
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(folder / name / fname)
            index.append({"kind": name, "file": f"{name}/{fname}", "id": row["id"], "path": row["path"],
                          "label": int(row["label"]), "pred": int(row["pred"]), "confidence": float(row["confidence"]),
                          "entropy": float(row["entropy"]), "mutual_information": float(row["mutual_information"]),
                          **({"explanation_stability": float(row["explanation_stability"])}
                             if "explanation_stability" in row else {})})
    pd.DataFrame(index).to_csv(folder / "index.csv", index=False)
    return {name: len(sub) for name, sub in picks.items()}


def _figures(dm, split, methods, temps, labels, probs, uncal, cls, unc, correct, df, fig_dir: Path, c) -> list[str]:
    paths = [figures.plot_reliability(uncal["reliability"], fig_dir / "reliability_uncalibrated.png", uncal["ece"],
                                      what="images, top-label, before TS"),
             figures.plot_reliability(cls["reliability"], fig_dir / "reliability.png", cls["ece"],
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
            (_image(dm, split, i), f"y={int(r['label'])} p={r['confidence']:.2f}") for i, r in sub.iterrows()]
    paths.append(figures.plot_image_grid(groups, fig_dir / "trust_quadrants.png", "trust quadrants (examples)"))
    return [str(p) for p in paths]
