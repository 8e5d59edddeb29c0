"""Evaluate a segmentation model on one split: metrics JSON, per-image table, threshold analysis,
calibration and figures. Used at the end of ``train.py`` and by ``evaluate.py`` so both write the
same numbers the same way."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torchmetrics.functional.classification import binary_average_precision, binary_precision_recall_curve

from medtrust.metrics.calibration import BinaryCalibrationMetric
from medtrust.metrics.segmentation import (
    METRIC_NAMES,
    compute_confusion,
    compute_segmentation_metrics,
    per_image_scores,
    threshold_sweep,
)
from medtrust.metrics.subgroups import (
    SUBGROUP_DEFAULTS,
    attribute_frame,
    segmentation_subgroups,
    write_subgroup_csvs,
)
from medtrust.report import figures
from medtrust.utils.io import write_json
from medtrust.utils.logging import get_logger

log = get_logger(__name__)

DEFAULTS: dict[str, Any] = {
    "thresholds": [round(0.05 * i, 2) for i in range(1, 20)],
    "calibration_bins": 15,
    "pr_thresholds": 101,
    "n_overlays": 6,
    "batch_size_abc": 6,
    "figures": True,
    "subgroups": SUBGROUP_DEFAULTS,   # per-group Dice / recall and gaps (see medtrust.metrics.subgroups)
}


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


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return -(p * p.log() + (1 - p) * (1 - p).log())


def evaluate_segmentation(
    task: torch.nn.Module,
    datamodule: Any,
    split: str,
    out_dir: str | Path,
    cfg: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate ``task`` on ``split`` of ``datamodule`` and write the results under ``out_dir``.

    Writes ``metrics/<split>.json``, ``metrics/<split>_per_image.csv``,
    ``metrics/<split>_threshold_sweep.csv``, ``metrics/<split>_pr_curve.csv`` and figures in
    ``figures/<split>/`` (overlays, batches A/B/C, confusion matrix, threshold sweep, PR curve,
    reliability diagram).

    Args:
        task: a segmentation task (``predict_step`` returning ``prob``; ``threshold`` attribute).
        datamodule: an :class:`~medtrust.data.datamodule.ImageDataModule`.
        split: ``train``/``val``/``test``.
        out_dir: the run (or evaluation) folder.
        cfg: evaluation settings (see :data:`DEFAULTS`).
        extra: more fields for the JSON (e.g. checkpoint path).

    Returns:
        The metrics dict written to ``metrics/<split>.json``.
    """
    c = {**DEFAULTS, **dict(cfg or {})}
    out_dir = Path(out_dir)
    pred = predict_split(task, datamodule, split)
    probs, target, recs = pred["prob"], pred["mask"], pred["records"]
    thr = float(task.threshold)

    confusion = compute_confusion(probs, target, thr)
    seg = compute_segmentation_metrics(confusion)
    per = {k: v.numpy() for k, v in per_image_scores(confusion).items()}
    cal_metric = BinaryCalibrationMetric(int(c["calibration_bins"]))
    cal_metric.update(probs, target)
    cal = {**cal_metric.compute(), "n_bins": int(c["calibration_bins"]), "reliability": cal_metric.reliability()}
    sweep = threshold_sweep(probs, target, c["thresholds"])
    best = max(sweep, key=lambda r: r["dice"])
    flat_p, flat_t = probs.reshape(-1), target.reshape(-1).long()
    prec, rec, pr_thr = binary_precision_recall_curve(flat_p, flat_t, thresholds=int(c["pr_thresholds"]))
    ap = float(binary_average_precision(flat_p, flat_t, thresholds=int(c["pr_thresholds"])))

    ent = binary_entropy(probs).flatten(1).mean(1).numpy()
    per_image = pd.DataFrame({
        "id": [r["id"] for r in recs], "patient_id": [r["patient_id"] for r in recs],
        "path": [r.get("path") for r in recs],
        **{k: per[k] for k in ("dice", "iou", "precision", "recall")},
        "gt_fraction": target.flatten(1).mean(1).numpy(),
        "pred_fraction": (probs >= thr).float().flatten(1).mean(1).numpy(),
        "mean_pixel_entropy": ent,
    })
    sub_cfg = {**SUBGROUP_DEFAULTS, **dict(c["subgroups"] or {})}
    attrs = attribute_frame(recs, sub_cfg["attributes"])
    attrs.columns = [a if a not in per_image.columns else f"attr_{a}" for a in attrs.columns]
    per_image = pd.concat([per_image, attrs], axis=1)
    mdir = out_dir / "metrics"
    mdir.mkdir(parents=True, exist_ok=True)
    per_image.to_csv(mdir / f"{split}_per_image.csv", index=False)
    pd.DataFrame(sweep).to_csv(mdir / f"{split}_threshold_sweep.csv", index=False)
    pd.DataFrame({"threshold": pr_thr.numpy(), "precision": prec[:-1].numpy(), "recall": rec[:-1].numpy()}).to_csv(
        mdir / f"{split}_pr_curve.csv", index=False)

    result: dict[str, Any] = {
        "split": split, "task": "segmentation", "threshold": thr, "n_images": len(recs),
        "seg": seg, "cal": cal,
        "threshold_analysis": {"best_dice_threshold": best["threshold"], "best_dice": best["dice"],
                               "pixel_average_precision": ap},
        "data": datamodule.summary(), **dict(extra or {}),
    }
    if c["figures"]:
        result["figures"] = _figures(datamodule, split, probs, target, recs, per, seg, cal, sweep, prec, rec, ap,
                                     thr, out_dir / "figures" / split, c)
    if len(attrs.columns):
        result["subgroups"] = segmentation_subgroups(per_image, list(attrs.columns), ("dice", "iou", "recall"),
                                                     int(sub_cfg["min_group_size"]), int(sub_cfg["bootstrap"]))
        write_subgroup_csvs(result["subgroups"], mdir, split)
    write_json(mdir / f"{split}.json", result)
    log.info(f"{split}: " + ", ".join(f"{k} {seg[k]:.4f}" for k in METRIC_NAMES) + f", ECE {cal['ece']:.4f}")
    return result


def _figures(dm: Any, split: str, probs: torch.Tensor, target: torch.Tensor, recs: Sequence[dict], per: dict,
             seg: dict, cal: dict, sweep: list, prec: torch.Tensor, rec: torch.Tensor, ap: float, thr: float,
             fig_dir: Path, c: Mapping[str, Any]) -> list[str]:
    paths = []
    pred_np = (probs >= thr).float().numpy()[:, 0]
    gt_np = target.numpy()[:, 0]

    def sample(ids: Sequence[int]) -> tuple[list, list, list, list]:
        ims = [dm.raw_image(split, int(i)) for i in ids]
        titles = [f"{recs[int(i)]['id']}\nDice {per['dice'][int(i)]:.3f}" for i in ids]
        return ims, [gt_np[int(i)] for i in ids], [pred_np[int(i)] for i in ids], titles

    n = min(int(c["n_overlays"]), len(recs))
    paths.append(figures.plot_overlay_grid(*sample(range(n)), fig_dir / "overlays.png",
                                           suptitle=f"{split}: first {n} images"))
    for name, ids in pick_batches(per["dice"], int(c["batch_size_abc"])).items():
        ims, gts, preds, titles = sample(ids)
        label = {"a_average": "A (average Dice)", "b_best": "B (best Dice)", "c_worst": "C (worst Dice)"}[name]
        mean = float(np.mean(per["dice"][ids]))
        paths.append(figures.plot_batch(ims, gts, preds, titles, fig_dir / f"batch_{name}.png",
                                        f"{split} batch {label}: mean Dice {mean:.3f} (split mean {seg['dice']:.3f})"))
    paths.append(figures.plot_confusion(seg, fig_dir / "confusion_matrix.png", f"{split} pixel confusion matrix"))
    paths.append(figures.plot_threshold_sweep(sweep, fig_dir / "threshold_sweep.png", thr))
    paths.append(figures.plot_pr_curve(prec.numpy(), rec.numpy(), fig_dir / "pr_curve.png", ap))
    paths.append(figures.plot_reliability(cal["reliability"], fig_dir / "reliability.png", cal["ece"]))
    return [str(p) for p in paths]
