"""Report section and trust lines of a quality-loop folder (``experiment=minim_quality``)."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medtrust.report.trust import fmt_ci
from medtrust.tasks.base import ReportSection, TrustLine


def _q(metrics: Mapping[str, Mapping[str, Any]]) -> Mapping[str, Any] | None:
    return metrics.get("quality_loop")


def _change_line(axis: str, name: str, c: Mapping[str, Any] | None, fitted_on: str, reported_on: str,
                 must_rise: bool) -> TrustLine:
    """A paired before/after share: ``meets`` when the whole CI of the difference is on the wanted side."""
    if not c or c.get("diff") is None:
        return TrustLine(axis, name, None, None, fitted_on, reported_on, "not measured", f"{axis}: {name} not measured")
    ci = c.get("diff_ci")
    shown = (f"{name} {c['before']:.3f} → {c['after']:.3f}, change {c['diff']:+.3f} {fmt_ci(ci)}, "
             f"permutation p = {c.get('p_permutation', float('nan')):.4f}")
    if ci is None:
        verdict = "inconclusive"
    elif must_rise:
        verdict = "meets" if ci[0] > 0 else "fails" if ci[1] <= 0 else "inconclusive"
    else:  # must not fall: a drop whose CI excludes 0 fails
        verdict = "fails" if ci[1] < 0 else "meets" if ci[0] > -0.05 else "inconclusive"
    words = {"meets": "rises" if must_rise else "kept", "fails": "does not rise" if must_rise else "falls",
             "inconclusive": "inconclusive"}[verdict]
    return TrustLine(axis, name, float(c["diff"]), tuple(ci) if ci else None, fitted_on, reported_on, verdict,
                     f"{words}: {shown}", "CI of the change > 0" if must_rise else "CI of the change > -0.05")


def quality_trust_lines(run_dir: Path, metrics: Mapping[str, Mapping[str, Any]]) -> list[TrustLine]:
    q = _q(metrics)
    if not q:
        return []
    where = q.get("evaluation_prompts", "")
    lines = []
    acc = q.get("selector_accuracy") or {}
    if acc.get("value") is not None:
        ci = acc.get("ci95") or [acc["value"], acc["value"]]
        verdict = "meets" if ci[0] >= 0.8 else "fails" if ci[1] < 0.8 else "inconclusive"
        lines.append(TrustLine("selector", "accuracy vs the known quality", float(acc["value"]),
                               tuple(acc["ci95"]) if acc.get("ci95") else None, "rated pool (selector train/cal/val)",
                               f"selector test ({acc.get('n')} rated images)", verdict,
                               f"selector accuracy {acc['value']:.3f} {fmt_ci(acc.get('ci95'))} against the known rating",
                               "whole CI ≥ 0.8"))
    lines.append(_change_line("quality", "top-rated share", q.get("top_rated_share"),
                              "fine-tuned on other (training) prompts", where, True))
    for key, name in (("finding_accuracy", "finding accuracy"), ("modality_accuracy", "modality accuracy")):
        if q.get(key):
            lines.append(_change_line("prompt fidelity", name, q[key], "fine-tuned on other (training) prompts", where, False))
    return lines


def _pct(v: Any) -> str:
    return "" if v is None else f"{100 * float(v):.1f} %"


def _pct_ci(ci: Any, signed: bool = False) -> str:
    if not ci or ci[0] is None:
        return ""
    f = "+.1f" if signed else ".1f"
    return f"[{100 * ci[0]:{f}}, {100 * ci[1]:{f}}]"


def _filtering_rows(f: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for attr, a in (f.get("attributes") or {}).items():
        for g, v in a["groups"].items():
            rows.append({"attribute": attr, "group": g, "n": v["n"], "kept": v["n_kept"],
                         "keep rate": f"{_pct(v['keep_rate'])} {_pct_ci(v.get('keep_rate_ci'))}",
                         "share of all": _pct(v["share_all"]), "share of kept": _pct(v["share_kept"]),
                         "change": (f"{100 * v['share_change']:+.1f} pt {_pct_ci(v.get('share_change_ci'), signed=True)}"
                                    if v.get("share_change") is not None else ""),
                         "χ² p": "" if a.get("chi2_p") is None else f"{a['chi2_p']:.3g}"})
    return rows


def quality_sections(run_dir: Path, metrics: Mapping[str, Mapping[str, Any]]) -> list[ReportSection]:
    q = _q(metrics)
    if not q:
        return []
    change_rows = []
    for key, name in (("top_rated_share", "top-rated share (known quality)"),
                      ("selector_top_share", f"selector score ≥ {q.get('keep_min_score')}"),
                      ("finding_accuracy", "finding accuracy (judge)"), ("modality_accuracy", "modality accuracy (judge)")):
        c = q.get(key)
        if c and c.get("diff") is not None:
            change_rows.append({"figure": name, "before": f"{c['before']:.3f} {fmt_ci(c.get('before_ci'))}",
                                "after": f"{c['after']:.3f} {fmt_ci(c.get('after_ci'))}",
                                "change": f"{c['diff']:+.3f} {fmt_ci(c.get('diff_ci'))}",
                                "p (prompt sign-flip)": f"{c.get('p_permutation', float('nan')):.4f}",
                                "images / prompts": f"{c['n_images']} / {c['n_prompts']}"})
    div = q.get("diversity_ms_ssim") or {}
    for when in ("before", "after"):
        if div.get(when):
            change_rows.append({"figure": f"MS-SSIM between samples of a prompt ({when})",
                                "before" if when == "before" else "after":
                                    f"{div[when].get('ms_ssim') or float('nan'):.3f} {fmt_ci(div[when].get('ci95'))}"})
    sel = q.get("selector") or {}
    sel_rows = [{"figure": "accuracy vs the known rating (test)", "value": _acc(sel.get("accuracy_known"))},
                {"figure": "accuracy vs the raters' mean (test)", "value": f"{sel.get('accuracy_vs_raters') or float('nan'):.3f}"},
                {"figure": "Krippendorff's α (ordinal) of the raters",
                 "value": _alpha(sel.get("agreement"))},
                {"figure": "probabilities", "value": f"{sel.get('method')}, temperature {sel.get('temperature') or 1:.2f} "
                                                      f"fitted on {sel.get('calibration_fitted_on')}"}]
    filt = {w: _filtering_rows(f) for w, f in (q.get("filtering") or {}).items()}
    per_mod = []
    for m, d in (q.get("per_modality") or {}).items():
        b, a = d.get("before", {}), d.get("after", {})
        row = {"modality": m, "n": d.get("n")}
        for key, name in (("top_rated_share", "top-rated (known)"), ("known_mean", "mean known rating"),
                          ("selector_mean", "mean selector score"), ("modality_accuracy", "modality accuracy (judge)")):
            if key in b:
                row[name] = f"{b[key]:.3f} → {a.get(key, float('nan')):.3f}"
        per_mod.append(row)
    return [ReportSection("quality/quality.html.j2", {
        "q": q, "change_rows": change_rows, "selector_rows": sel_rows, "filtering": filt, "per_modality": per_mod,
        "eval_selector": q.get("selector_on_eval_images") or {}, "commands": q.get("commands") or []})]


def _acc(a: Any) -> str:
    if not a:
        return "not measured (no known quality)"
    return f"{a['value']:.3f} {fmt_ci(a.get('ci95'))} (n = {a.get('n')})"


def _alpha(a: Any) -> str:
    if not a or a.get("alpha") is None:
        return f"undefined ({(a or {}).get('reason', 'no agreement data')})"
    return f"{a['alpha']:.3f} {fmt_ci(a.get('ci95'))} ({a.get('n_raters')} raters, {a.get('n_pairable')} images rated twice or more)"
