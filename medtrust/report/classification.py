"""The classifier's part of the report: its trust lines and its sections (calibration fit, trust
quadrants with the explanation-stability axis, failure cases), each rendered from a template in
``templates/classification/``."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from medtrust.report.trust import explanation_lines, report_split, subgroup_line, threshold_line, trust_thresholds
from medtrust.tasks.base import ReportSection, TrustLine


def trust_summary(run_dir: Path, metrics: Mapping[str, Mapping[str, Any]]) -> list[TrustLine]:
    th = trust_thresholds(metrics, "classification")
    lines: list[TrustLine] = []
    split = report_split({s: m for s, m in metrics.items() if m.get("cls")})
    if split is not None:
        m = metrics[split]
        where = f"{split} ({m.get('n_images')} images)"
        ci = m.get("ci95") or {}
        cal = m.get("calibration") or {}
        seen = bool(m.get("contains_training_images"))  # evaluate.py split=all on the run's own data
        fitted = (f"{cal['fitted_on']} ({cal.get('n_fitted_images')} images), {cal.get('method')}, T = "
                  f"{cal.get('temperature', 1.0):.2f}") if cal.get("fitted_on") else "nothing (no temperature)"
        lines.append(threshold_line("accuracy", "AUROC", m["cls"].get("auroc"), ci.get("auroc"), float(th["auroc_min"]),
                                    True, ("discriminates", "does not discriminate enough"),
                                    "weights: train; checkpoint: val", where, in_sample=seen or split in ("train", "val")))
        lines.append(threshold_line("calibration", "ECE (top-label, as reported)", m["cls"].get("ece_top_label"),
                                    ci.get("ece_top_label"), float(th["ece_max"]), False, ("calibrated", "not calibrated"),
                                    fitted, where, in_sample=seen or bool(cal.get("in_sample"))))
        names = ("tpr", "fpr", "auroc", "accuracy", "selection_rate")
        lines.append(subgroup_line(m, names, float(th["gap_max"]), float(th["alpha"]), where))
        st = (m.get("quadrants") or {}).get("stability") or {}
        if st.get("undefined"):
            lines.append(TrustLine("explanations", "Grad-CAM stability under MC dropout", None, None, "—", where,
                                   "not measured", f"explanation stability: {st['undefined']}"))
        elif st:
            lines.append(threshold_line("explanations", "Grad-CAM stability under MC dropout (mean Spearman)",
                                        st.get("mean"), st.get("ci95"), float(th["stability_min"]), True,
                                        ("stable", "unstable"), "—", where))
    explained = explanation_lines(run_dir, str(th.get("explanation_map", "gradcam")), th)
    if split is None or (run_dir / "metrics" / "explanations.json").is_file():
        lines += explained
    return lines


def report_sections(run_dir: Path, metrics: Mapping[str, Mapping[str, Any]], k: int = 8) -> list[ReportSection]:
    out = []
    cal = [{"split": s, **{key: v for key, v in m["calibration"].items()}} for s, m in metrics.items()
           if m.get("calibration")]
    if cal:
        out.append(ReportSection("classification/calibration.html.j2", {"rows": cal}))
    quad = [{"split": s, **m["quadrants"]["counts"], "confidence threshold": m["quadrants"].get("confidence_threshold"),
             "threshold fitted on": m["quadrants"].get("threshold_fitted_on")}
            for s, m in metrics.items() if isinstance(m.get("quadrants"), dict) and "counts" in m["quadrants"]]
    stab = [{"split": s, "method": st.get("method"), "threshold": st.get("threshold"),
             "counts": {c: v for c, v in st["counts"].items() if v}}
            for s, m in metrics.items() for st in [(m.get("quadrants") or {}).get("stability") or {}] if st.get("counts")]
    if quad:
        out.append(ReportSection("classification/quadrants.html.j2", {"rows": quad, "stability": stab}))
    conf = [{"split": s, "method": name, "fitted on": c.get("fitted_on"), "target": c.get("target_coverage"),
             **{k: b.get(k) for k in ("coverage", "mean_size", "singleton", "empty")},
             "in-sample": c.get("in_sample")}
            for s, m in metrics.items() for c in [m.get("conformal") or {}] for name, b in (c.get("methods") or {}).items()]
    if conf:
        alpha = next(m["conformal"]["alpha"] for m in metrics.values() if (m.get("conformal") or {}).get("methods"))
        out.append(ReportSection("classification/conformal.html.j2", {"rows": conf, "alpha": alpha}))
    recal = [{"split": s, **r, "in-sample": m["recalibration"].get("in_sample")}
             for s, m in metrics.items() for r in (m.get("recalibration") or {}).get("rows", [])]
    if recal:
        out.append(ReportSection("classification/recalibration.html.j2", {"rows": recal}))
    out += _ood_sections(run_dir, metrics)
    sh = run_dir / "metrics" / "shift.json"
    if sh.is_file():
        from medtrust.utils.io import read_json

        s = read_json(sh)
        keep = ("variant", "method", "recalibration", "severity", "accuracy", "ece_top_label", "brier", "nll",
                "aleatoric", "epistemic")
        out.append(ReportSection("classification/shift.html.j2", {
            "headline": s.get("headline"), "ranking": (s.get("headline") or {}).get("ranking", []),
            "by_severity": [{k: r.get(k) for k in keep} for r in s.get("by_severity", [])],
            "split": s.get("split"), "n_images": s.get("n_images"), "severities": s.get("severities", []),
            "prevalence": [{k: r.get(k) for k in ("positive_share", "n_images", "variant", "method", "temperature_scaled",
                                                   "estimated_prior_1", "accuracy", "ece_top_label", "brier", "nll")}
                           for r in s.get("prevalence", [])]}))
    for split in metrics:
        index = run_dir / "failure_cases" / split / "index.csv"
        if not index.is_file() or index.stat().st_size == 0:
            continue
        df = pd.read_csv(index)
        groups = [{"kind": str(kind).replace("_", " "), "cases": [
            {"image": index.parent / str(r["file"]),
             "caption": f"{r['id']}: y={r['label']} pred={r['pred']} p={r['confidence']:.2f} H={r['entropy']:.2f}"}
            for _, r in sub.iterrows() if (index.parent / str(r["file"])).is_file()]}
            for kind, sub in df.groupby("kind", sort=False)]
        out.append(ReportSection("classification/failure_cases.html.j2", {"split": split, "groups": groups}))
    return out


def _ood_sections(run_dir: Path, metrics: Mapping[str, Mapping[str, Any]]) -> list[ReportSection]:
    """The OOD section from ``metrics/ood.json`` (``evaluate.py ood.sets=[...]``) and the flags of each split."""
    from medtrust.utils.io import read_json

    flags = [{"split": s, **{k: v for k, v in m["ood_flag"].items() if k != "keep_in_distribution"}}
             for s, m in metrics.items() if (m.get("ood_flag") or {}).get("detector")]
    keep = next((m["ood_flag"].get("keep_in_distribution") for m in metrics.values()
                 if (m.get("ood_flag") or {}).get("detector")), 0.95)
    p = run_dir / "metrics" / "ood.json"
    if not p.is_file():
        return [ReportSection("classification/ood.html.j2", {"rows": [], "flags": flags, "keep": keep, "id_split": "—",
                                                              "n_in": 0, "features_from": "—"})] if flags else []
    o = read_json(p)
    rows = [{"set": name, "images": b["n_images"], "detector": d, "AUROC": r["auroc"], "FPR@95% TPR": r["fpr_at_95tpr"],
             "best": "yes" if d == b.get("best_detector") else ""}
            for name, b in o["sets"].items() for d, r in b["detectors"].items()]
    return [ReportSection("classification/ood.html.j2", {
        "rows": rows, "flags": flags, "keep": keep, "id_split": o["in_distribution"]["split"],
        "n_in": o["in_distribution"]["n_images"], "features_from": o.get("features_from") or "—"})]
