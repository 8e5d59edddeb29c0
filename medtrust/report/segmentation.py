"""The segmenter's part of the report: its trust lines and its sections (threshold analysis,
failure cases), each rendered from a template in ``templates/segmentation/``."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from medtrust.report.trust import explanation_lines, report_split, subgroup_line, threshold_line, trust_thresholds
from medtrust.tasks.base import ReportSection, TrustLine


def trust_summary(run_dir: Path, metrics: Mapping[str, Mapping[str, Any]]) -> list[TrustLine]:
    th = trust_thresholds(metrics, "segmentation")
    lines: list[TrustLine] = []
    split = report_split(metrics)
    if split is not None:
        m = metrics[split]
        where = f"{split} ({m.get('n_images')} images)"
        seen = bool(m.get("contains_training_images"))  # evaluate.py split=all on the run's own data
        chose = seen or split in ("train", "val")  # weights fitted on train, checkpoint chosen on val
        ci = m.get("ci95") or {}
        lines.append(threshold_line("accuracy", "Dice", (m.get("seg") or {}).get("dice"), ci.get("dice"),
                                    float(th["dice_min"]), True, ("accurate", "not accurate enough"),
                                    "weights: train; checkpoint: val", where, in_sample=chose))
        lines.append(threshold_line("calibration", "pixel ECE (positive class)", (m.get("cal") or {}).get("ece_positive"),
                                    ci.get("ece_positive"), float(th["ece_max"]), False, ("calibrated", "not calibrated"),
                                    "nothing (raw sigmoid probabilities)", where))
        lines.append(subgroup_line(m, ("dice", "iou", "recall"), float(th["gap_max"]), float(th["alpha"]), where))
    return lines + explanation_lines(run_dir, str(th.get("explanation_map", "gradcam_decoder")), th)


def report_sections(run_dir: Path, metrics: Mapping[str, Mapping[str, Any]], k: int = 8) -> list[ReportSection]:
    out = []
    rows = [{"split": s, **{key: v for key, v in m["threshold_analysis"].items()}}
            for s, m in metrics.items() if m.get("threshold_analysis")]
    if rows:
        out.append(ReportSection("segmentation/threshold_analysis.html.j2", {"rows": rows}))
    unc = [{"split": s, "samples": u.get("samples"), "MC passes": u.get("mc_passes"), "flip views": u.get("flip_views"),
            **{f"pixel-error AUROC ({k})": v for k, v in (u.get("pixel_error_auroc") or {}).items()},
            **{f"rho(Dice, {k})": (r or {}).get("rho") for k, r in (u.get("spearman_uncertainty_vs_dice") or {}).items()},
            **(u.get("qc") or {}), **{k: v for k, v in (u.get("boundary") or {}).items() if k.startswith("confidence")}}
           for s, m in metrics.items() for u in [m.get("uncertainty") or {}] if u]
    crc = [{"split": s, "threshold of": name, "alpha": c.get("alpha"), "fitted on": c.get("fitted_on"),
            **{k: b.get(k) for k in ("threshold", "fnr_mean", "n_lesion", "precision_pixels", "precision_mean", "dice")},
            "in-sample": c.get("in_sample")}
           for s, m in metrics.items() for c in [m.get("conformal_fnr") or {}] if "conformal" in c
           for name, b in (("conformal", c["conformal"]), ("model", c["model"]))]
    bsplit = next((s for s in ("test", "val") if (run_dir / "metrics" / f"{s}_boundary.csv").is_file()), None)
    boundary = pd.read_csv(run_dir / "metrics" / f"{bsplit}_boundary.csv").to_dict("records") if bsplit else []
    if unc or crc:
        out.append(ReportSection("segmentation/uncertainty.html.j2", {"rows": unc, "crc": crc, "boundary": boundary,
                                                                       "boundary_split": bsplit}))
    sh = run_dir / "metrics" / "shift.json"
    if sh.is_file():
        from medtrust.utils.io import read_json

        pp = read_json(sh)
        if pp.get("preprocessing"):
            keep = ("augmentation", "applied", "dice", "delta_dice", "iou", "delta_iou", "precision", "delta_precision",
                    "recall", "delta_recall", "accuracy", "delta_accuracy", "f1", "delta_f1", "reason")
            out.append(ReportSection("segmentation/preprocessing.html.j2", {
                "split": pp.get("split"), "rows": [{k: r.get(k) for k in keep if k in r} for r in pp["preprocessing"]]}))
    for split in metrics:
        per = run_dir / "metrics" / f"{split}_per_image.csv"
        if not per.is_file():
            continue
        df = pd.read_csv(per).sort_values("dice", na_position="first").head(k)
        worst = run_dir / "figures" / split / "batch_c_worst.png"
        out.append(ReportSection("segmentation/failure_cases.html.j2", {
            "split": split, "rows": df[[c for c in df.columns if c != "path"]].to_dict("records"),
            "worst": worst if worst.is_file() else None}))
    return out
