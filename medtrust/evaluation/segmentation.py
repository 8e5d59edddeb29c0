"""Evaluate a segmentation model on one split: metrics JSON, per-image table, threshold analysis,
calibration and figures. Used at the end of ``train.py`` and by ``evaluate.py`` so both write the
same numbers the same way.

What is fitted where: the weights on train, the checkpoint on val, and (post-fit) the best-Dice
probability threshold on ``evaluation.threshold_split`` (the carved calibration split when there is
one, else val). Each split reports Dice at the model's threshold and at that fitted threshold, and
marks as in-sample what was chosen on the split it is reported on.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from medtrust.evaluation.config import evaluation_config, fit_split, plain, to_plain
from medtrust.metrics.calibration import BinaryCalibrationMetric, calibration_bins, ece_from_bins
from medtrust.metrics.segmentation import (
    METRIC_NAMES,
    binned_pr_curve,
    compute_confusion,
    compute_segmentation_metrics,
    per_image_scores,
    threshold_sweep,
)
from medtrust.metrics.stats import bootstrap_ci, bootstrap_mean_ci
from medtrust.metrics.subgroups import attribute_frame, segmentation_subgroups, write_subgroup_csvs
from medtrust.report import figures
from medtrust.tasks.base import EvalResult
from medtrust.utils.io import read_json, write_csv, write_json
from medtrust.utils.logging import get_logger

log = get_logger(__name__)
THRESHOLD_FILE = "threshold.json"
CRC_FILE = "conformal_fnr_curves.safetensors"   # the FNR of each calibration image at CRC_GRID thresholds
CRC_GRID = 2001


@torch.inference_mode()
def predict_split(task: torch.nn.Module, datamodule: Any, split: str) -> dict[str, Any]:
    """Run ``task.predict_step`` over ``split`` (no augmentation).

    Returns:
        ``{"prob": N×1×H×W float, "mask": N×1×H×W float, "records": [...]}`` in dataset order.
    """
    device = next(task.parameters()).device
    was_training = task.training
    task.eval()
    probs, masks, index = [], [], []
    for batch in datamodule.dataloader(split):
        out = task.predict_step({"image": batch["image"].to(device)}, 0)
        probs.append(out["prob"].float().cpu())
        masks.append(batch["mask"].float())
        index.append(batch["index"])
    task.train(was_training)
    order = torch.cat(index).argsort()
    return {"prob": torch.cat(probs)[order], "mask": torch.cat(masks)[order],
            "records": datamodule.load_split(split)[2]}


def pick_batches(dice: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """GlassBox batches: A = the k images closest to the mean Dice, B = best k, C = worst k."""
    k = min(k, len(dice))
    order = np.argsort(dice, kind="stable")
    return {
        "a_average": np.argsort(np.abs(dice - dice.mean()), kind="stable")[:k],
        "b_best": order[::-1][:k],
        "c_worst": order[:k],
    }


BATCHES = {"a": "a_average", "b": "b_best", "c": "c_worst"}


def batch_indices(task: torch.nn.Module, datamodule: Any, split: str, batch: str, k: int) -> list[int]:
    """The images of GlassBox batch ``a`` (closest to the mean Dice), ``b`` (best) or ``c`` (worst) of ``split``
    at the model's threshold (explain.py ``batch=a|b|c``).

    Raises:
        ValueError: another batch name.
    """
    if str(batch).lower() not in BATCHES:
        raise ValueError(f"batch must be a, b or c (GlassBox's average, best and worst batches), got {batch!r}")
    pred = predict_split(task, datamodule, split)
    dice = per_image_scores(compute_confusion(pred["prob"], pred["mask"], float(task.threshold)))["dice"].numpy()
    return [int(i) for i in pick_batches(dice, k)[BATCHES[str(batch).lower()]]]


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return -(p * p.log() + (1 - p) * (1 - p).log())


def fit_threshold(task: torch.nn.Module, datamodule: Any, run_dir: str | Path, cfg: Any = None) -> dict[str, Any]:
    """Post-fit: the best-Dice probability threshold of the sweep on the threshold split; written to
    ``threshold.json``. It is reported next to (never instead of) the model's own threshold."""
    c = evaluation_config("segmentation", cfg)
    split = fit_split(datamodule, str(c.threshold_split), "evaluation.threshold_split")
    pred = predict_split(task, datamodule, split)
    sweep = threshold_sweep(pred["prob"], pred["mask"], list(c.thresholds))
    best = max(sweep, key=lambda r: r["dice"])
    out = {"fitted_on": split, "n_images": len(pred["records"]), "threshold": best["threshold"],
           "dice_on_fitted_split": best["dice"], "model_threshold": float(task.threshold)}
    # what conformal risk control fits at evaluation (any alpha): every calibration image's FNR curve
    from safetensors.torch import save

    from medtrust.metrics.conformal import fnr_curve
    from medtrust.utils.io import atomic_write_bytes

    ts = np.linspace(0.0, 1.0, CRC_GRID)
    curve = fnr_curve(pred["prob"], pred["mask"], ts)
    atomic_write_bytes(Path(run_dir) / CRC_FILE, save({"thresholds": torch.from_numpy(ts), "fnr": torch.from_numpy(curve),
                                                       "n_no_lesion": torch.tensor(len(pred["records"]) - len(curve))}))
    out["conformal_fnr_curves"] = {"file": CRC_FILE, "n_lesion": len(curve), "fitted_on": split}
    write_json(Path(run_dir) / THRESHOLD_FILE, out)
    log.info(f"best-Dice threshold {best['threshold']} chosen on {split} ({out['n_images']} images)")
    return {**out, "dir": str(Path(run_dir).resolve())}


def load_threshold(run_dir: str | Path) -> dict[str, Any] | None:
    """``threshold.json`` with the folder it was read from (``dir``: where the FNR curves are), or None."""
    p = Path(run_dir) / THRESHOLD_FILE
    return {**read_json(p), "dir": str(Path(run_dir).resolve())} if p.is_file() else None


def conformal_fnr_fit(fitted: Mapping[str, Any] | None, alpha: float) -> dict[str, Any]:
    """The conformal FNR threshold at ``alpha`` from the calibration FNR curves the run saved after
    training; ``{"unavailable": why}`` for a run without them, ``{"refused": why}`` for too few images."""
    from safetensors.torch import load_file

    from medtrust.metrics.conformal import crc_from_curve

    info = (fitted or {}).get("conformal_fnr_curves")
    path = Path(str((fitted or {}).get("dir", ""))) / CRC_FILE
    if not info or not path.is_file():
        return {"unavailable": f"no {CRC_FILE} in the run (written after training since issue 16): evaluate.py ... "
                               "refit=true fits it"}
    try:
        t = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - a corrupt file is named, whatever the parser raised
        raise ValueError(f"{path}: not a readable safetensors file of FNR curves ({err})") from err
    try:
        return {**crc_from_curve(t["fnr"].numpy(), t["thresholds"].numpy(), alpha, int(t["n_no_lesion"])),
                "fitted_on": f"{info['fitted_on']} ({info['n_lesion']} images with a lesion)"}
    except ValueError as err:  # evaluate.py stops on it; train.py keeps the run and reports it
        log.warning(str(err))
        return {"refused": f"fitted on {info['fitted_on']}: {err}"}


def _per_image_bins(probs: torch.Tensor, target: torch.Tensor, n_bins: int) -> torch.Tensor:
    """N×3×n_bins calibration bin sums per image (resampling images for the pixel-ECE CI)."""
    return torch.stack([calibration_bins(probs[i], target[i], n_bins) for i in range(len(probs))])


def evaluate_segmentation(task: torch.nn.Module, datamodule: Any, split: str, out_dir: str | Path,
                          cfg: Any = None, extra: Mapping[str, Any] | None = None,
                          fitted: Mapping[str, Any] | None = None) -> EvalResult:
    """Evaluate ``task`` on ``split`` of ``datamodule`` and write the results under ``out_dir``.

    Writes ``metrics/<split>.json``, ``metrics/<split>_per_image.csv``,
    ``metrics/<split>_threshold_sweep.csv``, ``metrics/<split>_pr_curve.csv``, subgroup CSVs and
    figures in ``figures/<split>/`` (overlays, batches A/B/C, confusion matrix, threshold sweep, PR
    curve, reliability diagram).

    Args:
        task: a segmentation task (``predict_step`` returning ``prob``; ``threshold`` attribute).
        datamodule: an :class:`~medtrust.data.datamodule.ImageDataModule`.
        split: ``train``/``val``/``test``/``cal``.
        out_dir: the run (or evaluation) folder.
        cfg: evaluation settings (``conf/evaluation/segmentation.yaml``).
        extra: more fields for the JSON (e.g. checkpoint path).
        fitted: what post-fit chose (``threshold.json``), reported alongside.
    """
    c = evaluation_config("segmentation", cfg)
    out_dir = Path(out_dir)
    pred = predict_split(task, datamodule, split)
    probs, target, recs = pred["prob"], pred["mask"], pred["records"]
    thr = float(task.threshold)
    n_bins, n_boot = int(c.calibration_bins), int(c.bootstrap)

    confusion = compute_confusion(probs, target, thr)
    seg = compute_segmentation_metrics(confusion)
    per = {k: v.numpy() for k, v in per_image_scores(confusion).items()}
    cal_metric = BinaryCalibrationMetric(n_bins)
    cal_metric.update(probs, target)
    raw_cal = cal_metric.compute()
    cal = {"ece_positive": raw_cal["ece"], "mce_positive": raw_cal["mce"], "brier": raw_cal["brier"],
           "n_bins": n_bins, "reliability": cal_metric.reliability()}
    ci: dict[str, Any] = {}
    if n_boot > 0 and len(recs) > 1:
        ci["dice"] = bootstrap_mean_ci(per["dice"], n_boot=n_boot)
        bins = _per_image_bins(probs, target, n_bins)
        ci["ece_positive"] = bootstrap_ci(lambda b: ece_from_bins(b.sum(0))["ece"], bins, n_boot=n_boot)
    sweep = threshold_sweep(probs, target, list(c.thresholds))
    best = max(sweep, key=lambda r: r["dice"])
    pr = binned_pr_curve(probs, target, int(c.pr_thresholds))

    ent = binary_entropy(probs).flatten(1).mean(1).numpy()
    per_image = pd.DataFrame({
        "id": [r["id"] for r in recs], "patient_id": [r["patient_id"] for r in recs],
        "path": [r.get("path") for r in recs],
        **{k: per[k] for k in ("dice", "iou", "precision", "recall")},
        "gt_fraction": target.flatten(1).mean(1).numpy(),
        "pred_fraction": (probs >= thr).float().flatten(1).mean(1).numpy(),
        "mean_pixel_entropy": ent,
    })
    sub_cfg = c.subgroups
    attrs = attribute_frame(recs, to_plain(sub_cfg.attributes))
    attrs.columns = [a if a not in per_image.columns else f"attr_{a}" for a in attrs.columns]
    per_image = pd.concat([per_image, attrs], axis=1)
    mdir = out_dir / "metrics"
    tables = {"per_image": mdir / f"{split}_per_image.csv", "threshold_sweep": mdir / f"{split}_threshold_sweep.csv",
              "pr_curve": mdir / f"{split}_pr_curve.csv"}
    write_csv(tables["per_image"], per_image)
    write_csv(tables["threshold_sweep"], pd.DataFrame(sweep))
    write_csv(tables["pr_curve"], pd.DataFrame({"threshold": pr["thresholds"].numpy(),
                                                 "precision": pr["precision"][:-1].numpy(),
                                                 "recall": pr["recall"][:-1].numpy()}))

    analysis: dict[str, Any] = {
        "best_dice_threshold": best["threshold"], "best_dice": best["dice"],
        "best_dice_in_sample": True,  # chosen on this split: optimistic for this split, by construction
        "pixel_average_precision": float(pr["average_precision"]),
    }
    if fitted and fitted.get("threshold") is not None:
        ft = float(fitted["threshold"])
        analysis.update({"fitted_threshold": ft, "fitted_on": fitted.get("fitted_on"),
                         "dice_at_fitted_threshold": compute_segmentation_metrics(compute_confusion(probs, target, ft))["dice"],
                         "fitted_in_sample": fitted.get("fitted_on") == split})
    extra_blocks: dict[str, Any] = {}
    if c.conformal.alpha is not None:
        from medtrust.evaluation.seg_uncertainty import crc_block
        from medtrust.metrics.conformal import check_alpha

        crc = conformal_fnr_fit(fitted, check_alpha(c.conformal.alpha, "evaluation.conformal.alpha"))
        extra_blocks["conformal_fnr"] = crc_block(probs, target, crc, thr, split) if "threshold" in crc else crc
        if "refused" in crc:
            extra_blocks["refused"] = [crc["refused"]]
    unc_tables: dict[str, Any] = {}
    if c.uncertainty.enabled:
        from medtrust.evaluation.seg_uncertainty import uncertainty_block

        extra_blocks["uncertainty"], unc_tables, unc_per = uncertainty_block(
            task, datamodule, split, target, per["dice"], thr, c, int(c.uncertainty.seed))
        for k, v in unc_per.items():
            per_image[k] = v
        write_csv(tables["per_image"], per_image)
        for name in ("qc_curve", "boundary"):
            tables[name] = mdir / f"{split}_{name}.csv"
            write_csv(tables[name], pd.DataFrame(unc_tables[name]))
    result: dict[str, Any] = {
        **extra_blocks,
        "split": split, "task": task.task_name, "metric_group": task.metric_group, "metric_groups": ["seg", "cal"],
        "threshold": thr, "n_images": len(recs), "seg": seg, "cal": cal, "ci95": ci,
        "threshold_analysis": analysis, "data": datamodule.summary(),
        "trust_thresholds": plain(c.trust), **dict(extra or {}),
    }
    figs: list[Path] = []
    if c.figures:
        figs = _figures(datamodule, split, probs, target, recs, per, seg, cal, sweep, pr, thr, out_dir / "figures" / split, c)
        if unc_tables:
            figs += _uncertainty_figures(datamodule, split, recs, per, target, unc_tables, out_dir / "figures" / split,
                                         int(c.uncertainty.n_maps))
        result["figures"] = [str(p) for p in figs]
    if len(attrs.columns):
        result["subgroups"] = segmentation_subgroups(per_image, list(attrs.columns), tuple(sub_cfg.metrics),
                                                     int(sub_cfg.min_group_size), int(sub_cfg.bootstrap))
        for p in write_subgroup_csvs(result["subgroups"], mdir, split):
            tables[Path(p).stem.removeprefix(f"{split}_")] = Path(p)
    result["tables"] = {k: str(v) for k, v in tables.items()}
    write_json(mdir / f"{split}.json", result)
    log.info(f"{split}: " + ", ".join(f"{k} {seg[k]:.4f}" for k in METRIC_NAMES) + f", pixel ECE {cal['ece_positive']:.4f}")
    return EvalResult(split, task.task_name, task.metric_group, result, tables, figs)




def _figures(dm: Any, split: str, probs: torch.Tensor, target: torch.Tensor, recs: Sequence[dict], per: dict,
             seg: dict, cal: dict, sweep: list, pr: Mapping[str, Any], thr: float, fig_dir: Path,
             c: Any) -> list[Path]:
    paths = []
    pred_np = (probs >= thr).float().numpy()[:, 0]
    gt_np = target.numpy()[:, 0]

    def sample(ids: Sequence[int]) -> tuple[list, list, list, list]:
        ims = [dm.raw_image(split, int(i)) for i in ids]
        titles = [f"{recs[int(i)]['id']}\nDice {per['dice'][int(i)]:.3f}" for i in ids]
        return ims, [gt_np[int(i)] for i in ids], [pred_np[int(i)] for i in ids], titles

    n = min(int(c.n_overlays), len(recs))
    paths.append(figures.plot_overlay_grid(*sample(range(n)), fig_dir / "overlays.png",
                                           suptitle=f"{split}: first {n} images"))
    confusion = compute_confusion(probs, target, thr)
    for name, ids in pick_batches(per["dice"], int(c.batch_size_abc)).items():
        ims, gts, preds, titles = sample(ids)
        label = {"a_average": "A (average Dice)", "b_best": "B (best Dice)", "c_worst": "C (worst Dice)"}[name]
        bm = compute_segmentation_metrics(confusion[torch.as_tensor(np.array(ids, dtype=np.int64))])
        six = ", ".join(f"{k} {bm[k]:.3f}" for k in ("dice", "iou", "precision", "recall", "accuracy", "f1"))
        paths.append(figures.plot_batch(ims, gts, preds, titles, fig_dir / f"batch_{name}.png",
                                        f"{split} batch {label}: {six}\n(split mean Dice {seg['dice']:.3f})"))
    paths.append(figures.plot_confusion(seg, fig_dir / "confusion_matrix.png", f"{split} pixel confusion matrix"))
    paths.append(figures.plot_threshold_sweep(sweep, fig_dir / "threshold_sweep.png", thr))
    paths.append(figures.plot_pr_curve(pr["precision"].numpy(), pr["recall"].numpy(), fig_dir / "pr_curve.png",
                                       float(pr["average_precision"])))
    paths.append(figures.plot_reliability(cal["reliability"], fig_dir / "reliability.png", cal["ece_positive"],
                                          what="pixels, positive class"))
    return [Path(p) for p in paths]


def _uncertainty_figures(dm: Any, split: str, recs: Sequence[dict], per: dict, target: torch.Tensor,
                         t: Mapping[str, Any], fig_dir: Path, n_maps: int) -> list[Path]:
    maps = t["maps"]
    paths = [figures.plot_boundary_profile(t["boundary"], fig_dir / "boundary_confidence.png")]
    if t["qc_curve"]:
        paths.append(figures.plot_qc_curve(t["qc_curve"], fig_dir / "qc_curve.png"))
    order = np.argsort(per["dice"], kind="stable")             # worst and best Dice first
    ids = list(dict.fromkeys([*order[: max(1, n_maps // 2)], *order[::-1][: max(1, n_maps - n_maps // 2)]]))[:n_maps]
    paths.append(figures.plot_uncertainty_maps(
        [dm.raw_image(split, int(i)) for i in ids], [target[int(i), 0].numpy() for i in ids],
        [maps["prob"][int(i), 0].numpy() for i in ids], [maps["entropy"][int(i), 0].numpy() for i in ids],
        [maps["mutual_information"][int(i), 0].numpy() for i in ids],
        [f"{recs[int(i)]['id']}\nDice {per['dice'][int(i)]:.3f}" for i in ids], fig_dir / "uncertainty_maps.png"))
    return [Path(p) for p in paths]


def _own_trust_figures(run_dir: str | Path, split: str) -> dict[str, Any]:
    """A run's conformal FNR control and pixel-uncertainty figures on ``split``, read from its own
    evaluation (``metrics/<split>.json``, written at the end of training; the runs compared share their
    splits), prefixed ``own_``; empty when the run has none."""
    p = Path(run_dir) / "metrics" / f"{split}.json"
    if not p.is_file():
        return {}
    m = json.loads(p.read_text())
    out: dict[str, Any] = {}
    crc = (m.get("conformal_fnr") or {}).get("conformal") or {}
    if "fnr_mean" in crc:
        out.update({"own_crc_alpha": (m.get("conformal_fnr") or {}).get("alpha"), "own_crc_fnr": crc["fnr_mean"],
                    "own_crc_precision": crc.get("precision_pixels")})
    auroc = (m.get("uncertainty") or {}).get("pixel_error_auroc") or {}
    for k in ("entropy", "mutual_information"):
        if k in auroc:
            out[f"own_pixel_error_auroc_{k}"] = auroc[k]
    return out


def _paired_dice_differences(rows: list[dict[str, Any]], dices: Sequence[np.ndarray], n_boot: int = 2000) -> None:
    """Each run's per-image Dice minus the first run's on the same images (in ``rows``): the mean, its
    paired 95 % bootstrap CI (BCa, seed 0) and the Wilcoxon signed-rank p-value, over the images where
    both are defined; so that a gap of 0.01 on 30 images is read against its noise."""
    from scipy.stats import wilcoxon

    from medtrust.metrics.stats import bootstrap_mean_ci

    for row, d in zip(rows[1:], dices[1:]):
        diff = np.asarray(d, float) - np.asarray(dices[0], float)
        diff = diff[np.isfinite(diff)]
        lo, hi = bootstrap_mean_ci(diff, n_boot=n_boot) if len(diff) > 1 else (float("nan"), float("nan"))
        p = float(wilcoxon(diff).pvalue) if len(diff) > 1 and np.any(diff != 0) else float("nan")
        row.update({"dice_diff_vs_first": float(diff.mean()) if len(diff) else float("nan"),
                    "dice_diff_ci_low": lo, "dice_diff_ci_high": hi, "dice_diff_wilcoxon_p": p,
                    "dice_diff_n_images": int(len(diff))})


def compare_segmenters(runs: Sequence[Any], datamodule: Any, split: str, out_dir: Path, n_show: int = 6,
                       on: str = "differ") -> list[dict[str, Any]]:
    """Segmenter runs on the same images: the summary metrics of each (at its own threshold), and
    a figure of ``n_show`` images: those on which their per-image Dice differs most (``on="differ"``) or
    GlassBox's batch ``a`` / ``b`` / ``c`` of the first run (``evaluation.compare_on``)."""
    if on not in ("differ", *BATCHES):
        raise ValueError(f"evaluation.compare_on must be differ, a, b or c, got {on!r}")
    rows, preds, dices = [], {}, {}
    gt = None
    for r in runs:
        out = predict_split(r.task, datamodule, split)
        conf = compute_confusion(out["prob"], out["mask"], r.task.threshold)
        m = compute_segmentation_metrics(conf)
        rows.append({"run": r.label, "run_dir": str(r.run_dir), **{k: m[k] for k in METRIC_NAMES},
                     "parameters": sum(p.numel() for p in r.task.parameters()), **_own_trust_figures(r.run_dir, split)})
        preds[r.label] = (out["prob"] >= r.task.threshold).float().numpy()[:, 0]
        dices[r.label] = per_image_scores(conf)["dice"].numpy()
        gt = out["mask"].numpy()[:, 0]
    _paired_dice_differences(rows, list(dices.values()))
    spread = np.stack(list(dices.values())).std(0)
    if on == "differ":
        ids = np.argsort(-spread, kind="stable")[: int(n_show)]
        what = "images where the runs' Dice differs most"
    else:
        ids = pick_batches(next(iter(dices.values())), int(n_show))[BATCHES[on]]
        what = f"GlassBox batch {on.upper()} of {runs[0].label}"
    images = [datamodule.raw_image(split, int(i)) for i in ids]
    figures.plot_comparison(images, [gt[i] for i in ids], {k: [v[i] for i in ids] for k, v in preds.items()},
                            {k: [float(v[i]) for i in ids] for k, v in dices.items()},
                            Path(out_dir) / "figures" / "comparison" / "comparison.png",
                            suptitle=f"{split}: {what}")
    return rows


def preprocessing_table(task: torch.nn.Module, datamodule: Any, split: str, augment: Mapping[str, Any],
                        seed: int = 0) -> list[dict[str, Any]]:
    """GlassBox's "effect of preprocessing on test metrics": ``split`` scored clean and with each of the 15
    augmentations applied at test time (probability 1, the run's bounds, seeded; geometric ones move the
    ground truth with the image), the six metrics and their change against clean. Colour augmentations on
    grayscale data are listed as not applicable."""
    from medtrust.data.transforms import AUGMENTATIONS, COLOUR_ONLY
    from medtrust.evaluation.ood import eval_loader

    six = ("dice", "iou", "precision", "recall", "accuracy", "f1")

    def score(ds: Any) -> dict[str, float]:
        probs, masks = [], []
        was = task.training
        task.eval()
        with torch.inference_mode():
            for batch in eval_loader(ds, datamodule.eval_batch_size):
                probs.append(task.predict_step({"image": batch["image"].to(next(task.parameters()).device)}, 0)["prob"]
                             .float().cpu())
                masks.append(batch["mask"].float())
        task.train(was)
        m = compute_segmentation_metrics(compute_confusion(torch.cat(probs), torch.cat(masks), float(task.threshold)))
        return {k: float(m[k]) for k in six}

    clean = score(datamodule.dataset(split))
    rows = [{"augmentation": "none (clean)", "applied": True, **clean, **{f"delta_{k}": 0.0 for k in six}}]
    for name in AUGMENTATIONS:
        block = dict(augment.get(name) or {})
        if name in COLOUR_ONLY and datamodule.channels != 3:
            rows.append({"augmentation": name, "applied": False, "reason": "needs RGB images"})
            continue
        block.update({"enabled": True, "prob": 1.0})
        m = score(datamodule.augmented_dataset(split, {name: block}, seed))
        rows.append({"augmentation": name, "applied": True, **m, **{f"delta_{k}": m[k] - clean[k] for k in six},
                     "settings": {k: to_plain(v) for k, v in block.items() if k not in ("enabled", "prob")}})
        log.info(f"test-time {name}: Dice {m['dice']:.4f} ({m['dice'] - clean['dice']:+.4f})")
    return rows
