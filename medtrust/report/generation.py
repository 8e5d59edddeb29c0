"""Report sections and trust lines of a generator run (``GenerationTask``)."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medtrust.report.trust import fmt_ci, report_split, subgroup_line, threshold_line
from medtrust.tasks.base import ReportSection, TrustLine

FIGURES = ("fid", "kid", "ms_ssim", "alignment", "alignment_unguided", "modality_accuracy", "finding_accuracy",
           "memorised_share")


JUDGE = "judge finding acc. (real val)"


def _rows(gen: Mapping[str, Any], ev: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Figures per modality, next to the judge's finding accuracy on that modality's REAL val images
    (a generated image's finding is judged only as well as real ones are)."""
    judge = ev.get("accuracy_real_val_modalities") or {}
    rows = [{"group": "overall", "n": gen["overall"].get("n_images"), **{k: gen["overall"].get(k) for k in FIGURES},
             JUDGE: (ev.get("accuracy_real_val") or {}).get("finding")}]
    for m, v in (gen.get("modalities") or {}).items():
        rows.append({"group": m, "n": v.get("n_images"), **{k: v.get(k) for k in FIGURES},
                     JUDGE: (judge.get(m) or {}).get("finding")})
    return rows


def _contrast(c: Any) -> str:
    if not isinstance(c, Mapping):
        return ""
    return f"{c.get('diff', float('nan')):+.2f} {fmt_ci(c.get('ci95'))}"


def generation_sections(run_dir: Path, metrics: Mapping[str, Mapping[str, Any]]) -> list[ReportSection]:
    per_split, align_rows, first = {}, [], None
    for split, m in metrics.items():
        gen = m.get("generation")
        if not gen:
            continue
        first = first or m
        per_split[split] = _rows(gen, m.get("evaluator") or {})
        for group, v in [("overall", gen["overall"]), *(gen.get("modalities") or {}).items()]:
            align_rows.append({"split": split, "group": group, "matching − shuffled": _contrast(v.get("alignment_vs_shuffled")),
                               "guided − unguided": _contrast(v.get("alignment_guided_vs_unguided"))})
    if first is None:
        return []
    ev = first.get("evaluator") or {}
    cal = first.get("memorisation") or {}
    memo_rows = [{"modality": g, "cosine ≥": v.get("cosine"), "SSIM ≥": v.get("ssim"), "real images": v.get("n"),
                  "pooled": v.get("pooled")} for g, v in (cal.get("groups") or {}).items()]
    real_rate = cal.get("real_flag_rate") or {}
    return [ReportSection("generation/generation.html.j2", {
        "memo_rows": memo_rows, "memo_fitted_on": cal.get("fitted_on"), "memo_quantile": cal.get("quantile"),
        "memo_in_sample": cal.get("real_flag_rate_in_sample"),
        "memo_real_rate": (f"{real_rate['value']:.3f} {fmt_ci(real_rate.get('ci95'))} on {real_rate.get('n')} real "
                           f"{real_rate.get('split')} images" if real_rate.get("value") is not None else None),
        "per_split": per_split, "alignment_rows": align_rows, "k": first.get("samples_per_prompt"),
        "sampling": ", ".join(f"{k} {v}" for k, v in (first.get("sampling") or {}).items()),
        "feature_network": ev.get("feature_network", "unknown"), "fitted_on": ev.get("fitted_on", "?"),
        "reported_on": ev.get("reported_on", "?"), "real_acc": ev.get("accuracy_real_val")})]


def generation_trust_lines(run_dir: Path, metrics: Mapping[str, Mapping[str, Any]]) -> list[TrustLine]:
    split = report_split({s: m for s, m in metrics.items() if m.get("generation")})
    if split is None:
        return []
    m = metrics[split]
    ov = m["generation"]["overall"]
    th = m.get("trust_thresholds") or {}
    where = f"{split} prompts ({m.get('n_images')} generated images)"
    judged = "weights: train; judge: evaluator CNN trained on real train images"
    cal = m.get("memorisation") or {}
    judged_copy = (f"{judged}; near-copy thresholds fitted on {cal['fitted_on']} (q = {cal.get('quantile')})"
                   if cal.get("fitted_on") else f"{judged}; fixed near-copy thresholds (not calibrated)")
    lines = [threshold_line("accuracy", "modality accuracy of generated images", ov.get("modality_accuracy"),
                            ov.get("modality_accuracy_ci"), float(th.get("modality_accuracy_min", 0.95)), True,
                            ("modality faithful", "modality unfaithful"), judged, where),
             threshold_line("accuracy", "finding accuracy vs the prompt", ov.get("finding_accuracy"),
                            ov.get("finding_accuracy_ci"), float(th.get("finding_accuracy_min", 0.8)), True,
                            ("finding faithful", "finding unfaithful"), judged, where),
             threshold_line("memorisation", "near copies of training images", ov.get("memorised_share"),
                            ov.get("memorised_share_ci"), float(th.get("memorised_share_max", 0.05)), False,
                            ("not memorising", "memorising"), judged_copy, where)]
    judge = {k: v.get("finding") for k, v in ((m.get("evaluator") or {}).get("accuracy_real_val_modalities") or {}).items()
             if isinstance(v, Mapping) and v.get("finding") is not None}
    if judge:  # the finding figures mean little for a modality whose real images the judge cannot read
        worst = min(judge, key=judge.get)
        lines.append(threshold_line("accuracy", f"judge's finding accuracy on real val images, worst modality ({worst})",
                                    judge[worst], None, float(th.get("finding_accuracy_min", 0.8)), True,
                                    ("judge reads findings", "judge cannot read findings"),
                                    "judge: evaluator CNN trained on real train images", "real val images"))
    c = ov.get("alignment_guided_vs_unguided")
    if isinstance(c, Mapping):
        lines.append(threshold_line("alignment", "alignment gain from guidance", c.get("diff"), c.get("ci95"), 0.0, True,
                                    ("guidance aligns", "guidance does not align"), judged, where))
    if m.get("subgroups"):
        lines.append(subgroup_line(m, ("modality_correct", "finding_correct"), float(th.get("gap_max", 0.1)),
                                   float(th.get("alpha", 0.05)), where))
    return lines
