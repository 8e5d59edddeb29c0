"""The audit section of an audit folder's report (``evaluate.py audit=<name>``): bar charts with CIs per
subgroup (the finding classifier's TPR with and without demographic terms, the selection-rate shift of
each group, the hallucination excess per group) and the tables behind them."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from medtrust.report.figures import _save  # noqa: E402
from medtrust.report.trust import fmt_ci  # noqa: E402
from medtrust.tasks.base import ReportSection  # noqa: E402


def _bars(ax: plt.Axes, labels: list[str], series: Mapping[str, list[tuple[float | None, list[float] | None]]],
          ylabel: str, zero: bool = False) -> None:
    x = np.arange(len(labels))
    w = 0.8 / max(1, len(series))
    for k, (name, vals) in enumerate(series.items()):
        v = np.array([np.nan if a is None else a for a, _ in vals], float)
        lo = np.array([np.nan if (c is None or a is None) else a - c[0] for a, c in vals], float)
        hi = np.array([np.nan if (c is None or a is None) else c[1] - a for a, c in vals], float)
        ax.bar(x + (k - (len(series) - 1) / 2) * w, v, w, yerr=np.nan_to_num(np.stack([lo, hi])), capsize=3, label=name)
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if zero:
        ax.axhline(0, color="k", lw=0.8)
    if len(series) > 1:
        ax.legend(fontsize=8)


def _cell(c: Mapping[str, Any]) -> tuple[float | None, list[float] | None]:
    return (c.get("rate"), c.get("ci")) if c.get("status") == "ok" else (None, None)


def audit_figures(run_dir: Path, m: Mapping[str, Any]) -> list[tuple[Path, str]]:
    out = []
    attrs = [a for a in m["bias"] if "&" not in a]
    fig, axes = plt.subplots(1, len(attrs), figsize=(4 * len(attrs), 3.2), squeeze=False)
    for ax, a in zip(axes[0], attrs):
        groups = list(m["bias"][a]["metrics"]["tpr"]["groups"])
        _bars(ax, groups, {"prompt names the group": [_cell(m["bias"][a]["metrics"]["tpr"]["groups"][g]) for g in groups],
                           "neutral prompt": [_cell(m["bias_neutral"][a]["metrics"]["tpr"]["groups"].get(g, {})) for g in groups]},
              "TPR (95 % CI)")
        ax.set_title(a, fontsize=9)
    out.append((_save(fig, run_dir / "figures" / "audit" / "tpr_by_group.png"),
                f"TPR of the {m['finding']} classifier per group, prompts with and without demographic terms"))
    shift = {k: v for k, v in m["selection_rate_shift"].items() if "&" not in k}
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(shift)), 3.2))
    _bars(ax, list(shift), {"shift": [(v.get("shift"), v.get("shift_ci")) if v.get("status") == "ok" else (None, None)
                                      for v in shift.values()]}, "selection rate: with - without terms", zero=True)
    out.append((_save(fig, run_dir / "figures" / "audit" / "selection_rate_shift.png"),
                "change in selection rate when the prompt names the group (paired over counterfactual pairs, 95 % CI)"))
    h = m["hallucination"]
    labels, vals = ["all"], [(h.get("excess"), h.get("excess_ci"))]
    for a, g in h.get("by_group", {}).items():
        for v, c in g.items():
            labels.append(f"{a}={v}")
            vals.append((c.get("excess"), c.get("excess_ci")) if c.get("status") == "ok" else (None, None))
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * len(labels)), 3.2))
    _bars(ax, labels, {"excess": vals}, f"{m['hallucinated']} flags: excess over real", zero=True)
    out.append((_save(fig, run_dir / "figures" / "audit" / "hallucination_by_group.png"),
                f"hallucinated {m['hallucinated']}: flag rate on generated images minus the rate on real images without it (95 % CI)"))
    return out


def audit_sections(run_dir: Path, m: Mapping[str, Any]) -> list[ReportSection]:
    figs = audit_figures(run_dir, m)
    bias_rows = []
    for variant, blk in (("with terms", m["bias"]), ("neutral", m["bias_neutral"])):
        for a, b in blk.items():
            c = b.get("corrected") or {}
            bias_rows.append({"prompts": variant, "attribute": a, "TPR gap [95 % CI]": None if b["gap"] is None else
                              f"{b['gap']:.3f} {fmt_ci(b['gap_ci'])}", "highest": b["highest"], "lowest": b["lowest"],
                              "ratio": b["ratio"], "p": b["p"], "corrected gap [95 % CI]": None if c.get("gap") is None else
                              f"{c['gap']:.3f} {fmt_ci(c['gap_ci'])}"})
    h = m["hallucination"]
    hall_rows = [{"classifier": name, "rate": v.get("rate"), "real rate": v.get("real_rate"),
                  "excess [95 % CI]": None if v.get("excess") is None else f"{v['excess']:.3f} {fmt_ci(v.get('excess_ci'))}",
                  "corrected [95 % CI]": None if v.get("corrected") is None else f"{v['corrected']:.3f} {fmt_ci(v.get('corrected_ci'))}",
                  "p": v.get("p"), "n": v.get("n")}
                 for name, v in [(f"consensus ({h.get('consensus')})", h), *h.get("per_classifier", {}).items()]]
    shift_rows = [{"group": k, "pairs": v.get("n_pairs", v.get("n")), "with": v.get("rate_with"), "without": v.get("rate_without"),
                   "shift [95 % CI]": f"{v['shift']:.3f} {fmt_ci(v['shift_ci'])}" if v.get("status") == "ok" else "insufficient",
                   "relative": v.get("relative_shift")} for k, v in m["selection_rate_shift"].items()]
    def _v(c: Mapping[str, Any], key: str) -> Any:
        return c.get(key) if c.get("status") == "ok" else f"insufficient (n={c.get('n')})" if key == "accuracy" else None

    valid_rows = []
    for clf, blocks in (m.get("validity_by_classifier") or {}).items():
        for cls_name, entry in blocks.items():
            r, g = entry["overall"]["real"], entry["overall"]["synthetic"]
            valid_rows.append({"classifier": clf, "class": cls_name, "real: n": r.get("n"), "accuracy": _v(r, "accuracy"),
                               "ECE": _v(r, "ece"), "MI": _v(r, "mutual_information"), "synthetic: n": g.get("n"),
                               "accuracy ": _v(g, "accuracy"), "ECE ": _v(g, "ece"), "MI ": _v(g, "mutual_information")})
    down_rows = []
    if d := m.get("downstream"):
        for metric in ("auroc", "accuracy"):
            v = d[metric]
            down_rows.append({"metric": metric, "without synthetic": v["baseline"], "with synthetic": v["augmented"],
                              "change [95 % CI]": f"{v['diff']:.3f} {fmt_ci(v['diff_ci'])}",
                              "relative": v["relative_change"], "SD across pairs": v["diff_sd_across_pairs"]})
    return [ReportSection("audit/audit.html.j2", {"m": m, "figures": figs, "bias_rows": bias_rows, "hall_rows": hall_rows,
                                                  "shift_rows": shift_rows, "down_rows": down_rows,
                                                  "valid_rows": valid_rows})]
