"""The anomaly section of a SAFEGEN run's report and its trust lines (artifacts axis)."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medtrust.report.trust import fmt_ci, report_split, threshold_line
from medtrust.tasks.base import ReportSection, TrustLine

COLUMNS = ("auroc", "pixel_auroc", "dice", "iou", "pointing_game", "relevance_mass", "spearman_severity",
           "spearman_map_mask", "flagged_injected", "flagged_clean")


def _row(name: str, v: Mapping[str, Any]) -> dict[str, Any]:
    return {"cohort": name, "injected": v.get("n_injected"), "clean": v.get("n_clean"),
            "AUROC [95 % CI]": (f"{v['auroc']:.3f} {fmt_ci(v.get('auroc_ci'))}" if isinstance(v.get("auroc"), float) else None),
            **{k: v.get(k) for k in COLUMNS if k != "auroc"}}


def _auc(v: Mapping[str, Any]) -> str | None:
    return f"{v['auroc']:.3f} {fmt_ci(v.get('auroc_ci'))}" if isinstance(v.get("auroc"), float) else None


def anomaly_sections(run_dir: Path, metrics: Mapping[str, Mapping[str, Any]]) -> list[ReportSection]:
    per_split, det_rows, rater_rows, kind_rows = {}, [], [], []
    first = None
    for split, m in metrics.items():
        if "cohorts" not in m or "overall" not in m:
            continue
        first = first or m
        per_split[split] = [_row("overall", m["overall"]), *(_row(c, v) for c, v in m["cohorts"].items())]
        for kind, v in (m.get("kinds") or {}).items():
            kind_rows.append({"split": split, "kind": kind, "injected": v.get("n_injected"), "AUROC [95 % CI]": _auc(v),
                              "ρ(score, severity)": v.get("spearman_severity")})
        r = m.get("raters")
        if r:
            k, c = r.get("krippendorff") or {}, (r.get("correlation_with_map") or {})
            groups = {f"ρ {g}": (v.get("rho") if v.get("rho") is None else round(v["rho"], 3))
                      for g, v in (c.get("groups") or {}).items()}
            rater_rows.append({"split": split, "ratings": r.get("n_ratings"), "raters": r.get("n_raters"),
                               "Krippendorff α [95 % CI]": None if k.get("alpha") is None else
                               f"{k['alpha']:.3f} {fmt_ci(k.get('ci95'))}",
                               "ρ rating vs map": (c.get("overall") or {}).get("rho"),
                               "regions": (c.get("overall") or {}).get("n"), **groups})
        for name, d in (m.get("detectors") or {}).items():
            det_rows.append({"split": split, "score": name, **{g: _auc(v) for g, v in
                                                               [("overall", d["overall"]), *d["cohorts"].items()]}})
    if first is None:
        return []
    return [ReportSection("anomaly/anomaly.html.j2", {"per_split": per_split, "detector_rows": det_rows,
                                                      "rater_rows": rater_rows, "kind_rows": kind_rows,
                                                      "fitted": first.get("fitted") or {},
                                                      "reconstruction": first.get("reconstruction") or {},
                                                      "benchmark": first.get("benchmark") or {}})]


def anomaly_trust_lines(run_dir: Path, metrics: Mapping[str, Mapping[str, Any]]) -> list[TrustLine]:
    split = report_split({s: m for s, m in metrics.items() if "overall" in m and "cohorts" in m})
    if split is None:
        return []
    m = metrics[split]
    o, th, f = m["overall"], m.get("trust_thresholds") or {}, m.get("fitted") or {}
    where = f"{split} artifact benchmark ({o.get('n_injected')} injected, {o.get('n_clean')} clean images)"
    fitted = f"weights: train (real images only); residual statistics and thresholds: {f.get('statistics_fitted_on')}"
    return [threshold_line("artifacts", "image AUROC, injected vs clean", o.get("auroc"), o.get("auroc_ci"),
                           float(th.get("auroc_min", 0.89)), True, ("detects artifacts", "misses artifacts"),
                           fitted, where, in_sample=bool(f.get("in_sample"))),
            threshold_line("artifacts", "Spearman ρ of score and severity", o.get("spearman_severity"), None,
                           float(th.get("spearman_severity_min", 0.8)), True, ("scales with severity", "does not scale"),
                           fitted, where)]
