"""Building the report's trust summary: one plain-language line per trust axis, each with its
figure, 95 % CI, what it was fitted on and reported on, and a verdict against a threshold of the
evaluation config (``evaluation.trust``). Tasks assemble their lines from these helpers.

Verdicts: ``meets`` when the whole CI is on the good side of the threshold, ``fails`` when the
whole CI is on the bad side, ``inconclusive`` when the CI contains the threshold (the data cannot
tell), ``in-sample`` when the figure was fitted or chosen on the very images it is reported on
(the verdict is withheld), ``not measured`` when the folder has no such figure. Without a CI the
point estimate decides, and the line says so.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medtrust.tasks.base import TrustLine

REPORT_SPLITS = ("test", "val", "cal", "train")


def report_split(metrics: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The split the summary speaks for: test when there is one, else val, ..."""
    return next((s for s in REPORT_SPLITS if s in metrics), next(iter(metrics), None))


def trust_thresholds(metrics: Mapping[str, Mapping[str, Any]], evaluation: str) -> dict[str, Any]:
    """The thresholds the evaluation used (saved in its metrics files), else the defaults of
    ``conf/evaluation/<evaluation>.yaml`` (e.g. an explain.py folder, which has no metrics file)."""
    for m in metrics.values():
        if m.get("trust_thresholds"):
            return dict(m["trust_thresholds"])
    from medtrust.evaluation.config import evaluation_config, to_plain

    return to_plain(evaluation_config(evaluation).trust)


def fmt_ci(ci: Sequence[float | None] | None) -> str:
    if not ci or len(ci) != 2 or ci[0] is None or ci[1] is None:
        return ""
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _ci(ci: Any) -> tuple[float, float] | None:
    if isinstance(ci, Mapping):
        ci = ci.get("ci95") or (ci.get("low"), ci.get("high"))
    if not ci or len(ci) != 2 or ci[0] is None or ci[1] is None:
        return None
    return float(ci[0]), float(ci[1])


def threshold_line(axis: str, name: str, value: float | None, ci: Any, threshold: float, higher_is_better: bool,
                   words: tuple[str, str], fitted_on: str, reported_on: str, in_sample: bool = False) -> TrustLine:
    """A line for a figure judged against one threshold.

    Args:
        words: ``(good, bad)`` adjectives, e.g. ``("calibrated", "not calibrated")``.
        in_sample: the figure's fitted parts were fitted on the images it is reported on.
    """
    op_ok, op_bad = ("≥", "<") if higher_is_better else ("≤", ">")
    rule = f"{op_ok} {threshold:g}"
    if value is None:
        return TrustLine(axis, name, None, None, fitted_on, reported_on, "not measured",
                         f"{axis}: {name} not measured", rule)
    c = _ci(ci)
    shown = f"{name} {value:.3f}" + (f" {fmt_ci(c)}" if c else " (no CI)")
    good = (lambda v: v >= threshold) if higher_is_better else (lambda v: v <= threshold)
    if c is not None:
        verdict = "meets" if good(c[0]) and good(c[1]) else "fails" if not good(c[0]) and not good(c[1]) else "inconclusive"
    else:
        verdict = "meets" if good(value) else "fails"
    if verdict == "meets":
        text = f"{words[0]}: {shown} {op_ok} {threshold:g}"
    elif verdict == "fails":
        text = f"{words[1]}: {shown} {op_bad} {threshold:g}"
    else:
        text = f"inconclusive ({words[0]}?): {shown} contains {threshold:g}"
    if in_sample:  # the figure is optimistic by construction: state it, judge nothing
        verdict, text = "in-sample", f"{axis}: {shown} (threshold {rule}) — in-sample: fitted on the same images, no verdict"
    return TrustLine(axis, name, float(value), c, fitted_on, reported_on, verdict, text, rule)


def subgroup_line(m: Mapping[str, Any], metric_names: Sequence[str], gap_max: float, alpha: float,
                  reported_on: str) -> TrustLine:
    """The largest subgroup gap over the attributes and ``metric_names`` of a split's ``subgroups``:
    a disparity when it exceeds ``gap_max`` and its permutation p is below ``alpha``."""
    rule = f"gap ≤ {gap_max:g} or p ≥ {alpha:g}"
    sub = (m.get("subgroups") or {}).get("attributes") or {}
    gaps = [(attr, k, g) for attr, a in sub.items() for k, g in (a.get("gaps") or {}).items()
            if k in metric_names and g.get("gap") is not None]
    if not gaps:
        why = "no attribute with two groups large enough" if sub else "no sensitive attributes"
        return TrustLine("subgroups", "largest gap", None, None, "—", reported_on, "not measured",
                         f"subgroups: not measured ({why})", rule)
    over = [x for x in gaps if x[2]["gap"] > gap_max]
    significant = [x for x in over if x[2].get("p_value") is not None and x[2]["p_value"] < alpha]
    attr, k, g = max(significant or over or gaps, key=lambda x: x[2]["gap"])
    ci = _ci(g.get("ci95"))
    p = g.get("p_value")
    shown = (f"{k} gap {g['gap']:.3f} ({attr}: {g.get('highest')} vs {g.get('lowest')})"
             + (f" {fmt_ci(ci)}" if ci else "") + (f", p = {p:.3f}" if p is not None else ""))
    if significant:
        verdict, text = "fails", f"disparity: {shown} > {gap_max:g} with p < {alpha:g}"
    elif over:
        verdict, text = "inconclusive", f"possible disparity: {shown} > {gap_max:g}, but p ≥ {alpha:g} at this sample size"
    else:
        verdict, text = "meets", f"no gap above {gap_max:g}: largest {shown}"
    text += f" ({len(gaps)} gaps tested)"
    return TrustLine("subgroups", f"largest {k} gap", float(g["gap"]), ci, "—", reported_on, verdict, text, rule)


def explanation_lines(run_dir: Path, map_name: str, thresholds: Mapping[str, Any]) -> list[TrustLine]:
    """Localisation (pointing game) and MC-dropout stability (Spearman) of ``map_name`` from an
    explain.py folder's ``metrics/explanations.json``; a "not measured" line pointing at explain.py
    when the folder has none."""
    p = Path(run_dir) / "metrics" / "explanations.json"
    if not p.is_file():
        return [TrustLine("explanations", "localisation / stability", None, None, "—", "—", "not measured",
                          "explanations: not measured in this folder (python explain.py run_dir=<run>)")]
    r = json.loads(p.read_text())
    where = f"{r.get('split')} ({r.get('n_images')} images)"
    if map_name not in r.get("maps", []):
        return [TrustLine("explanations", map_name, None, None, "—", where, "not measured",
                          f"explanations: map {map_name!r} not computed (maps: {r.get('maps')}; "
                          "set evaluation.trust.explanation_map)")]
    pg = ((r.get("localisation") or {}).get(map_name) or {}).get("pointing_game") or {}
    st = (((r.get("stability") or {}).get(map_name) or {}).get("mc_dropout") or {}).get("spearman") or {}
    lines = [threshold_line("explanations", f"{map_name} pointing game", pg.get("mean"), pg.get("ci95"),
                            float(thresholds.get("pointing_game_min", 0.5)), True, ("localises", "does not localise"),
                            "—", where + (f", {pg.get('n_undefined')} undefined" if pg.get("n_undefined") else ""))]
    undefined = ((r.get("stability_undefined") or {}).get("mc_dropout"))
    if undefined:
        lines.append(TrustLine("explanations", f"{map_name} MC-dropout stability", None, None, "—", where,
                               "not measured", f"explanation stability: {undefined}"))
    else:
        lines.append(threshold_line("explanations", f"{map_name} MC-dropout stability (Spearman)", st.get("mean"),
                                    st.get("ci95"), float(thresholds.get("stability_min", 0.8)), True,
                                    ("stable", "unstable"), "—", where))
    return lines
