"""One self-contained HTML trust report per run folder (images embedded as base64), rendered from
Jinja2 templates with autoescape on, one template per section (``medtrust/report/templates/``).

The report is built from what is on disk (``metrics/*.json``, ``figures/**.png``, ``splits/``,
``config.yaml``), so it covers whatever the run produced and can be rebuilt at any time. It opens
with the trust summary (one line per trust axis, from ``task.trust_summary``), then the generic
sections, then the task's own (``task.report_sections``: a task adds a section by adding a
template), then subgroups, explanations, figures and the rest.
"""
from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
from jinja2 import ChoiceLoader, Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup, escape

from medtrust.report.summary import scalar_metrics
from medtrust.tasks.base import ReportSection
from medtrust.utils.io import atomic_write_bytes
from medtrust.utils.logging import get_logger

log = get_logger(__name__)
TEMPLATES = Path(__file__).parent / "templates"

INTENDED_USE = (
    "Research tool for studying the trustworthiness of medical-imaging models. It is not a medical "
    "device and must not be used for diagnosis, treatment or any clinical decision. Results on phantom "
    "(procedural) data show that the pipeline works and recovers known ground truth; they say nothing about "
    "clinical performance."
)

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;color:#222}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
h3{font-size:15px}table{border-collapse:collapse;margin:8px 0;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}.box{background:#fff6e0;border:1px solid #e0c080;padding:10px;
border-radius:6px}.muted{color:#666;font-size:12px}figure{display:inline-block;margin:6px;vertical-align:top}
figcaption{font-size:12px;color:#444}img{max-width:100%;border:1px solid #eee}pre{background:#f7f7f7;
padding:8px;font-size:11px;overflow:auto;max-height:400px}
table.trust td{text-align:left}.v-meets{background:#e3f4e1}.v-fails{background:#fbe0de}
.v-inconclusive,.v-in-sample{background:#fff3cd}.v-not-measured{color:#777}
"""


# -- template helpers ------------------------------------------------------------------------
def figure(path: Path | str, caption: str, width: int | None = None) -> Markup:
    """An embedded PNG with its caption (the caption is escaped)."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    size = f" width={int(width)}" if width else ""
    return Markup(f'<figure><img alt="{escape(caption)}"{size} src="data:image/png;base64,{data}">'
                  f"<figcaption>{escape(caption)}</figcaption></figure>")


def fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return "" if value is None else str(value)


def columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r))


def environment(search_path: Sequence[Path] = ()) -> Environment:
    """Jinja2 environment: the given folders first (a task's own templates), then the package's."""
    env = Environment(loader=ChoiceLoader([FileSystemLoader([str(p) for p in search_path]),
                                           FileSystemLoader(str(TEMPLATES))]),
                      autoescape=True, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.globals.update(figure=figure, columns=columns)
    env.filters["num"] = fmt
    return env


def render(section: ReportSection) -> Markup:
    return Markup(environment(section.search_path).get_template(section.template).render(**section.context))


# -- what the folder holds ----------------------------------------------------------------------
def dataset_licence(location: str | None) -> str | None:
    """The licence line of the README next to a data set (``**Licence**: ...``), if there is one."""
    if not location:
        return None
    p = Path(location)
    for folder in (p if p.is_dir() else p.parent, p.parent.parent):
        readme = folder / "README.md"
        if readme.exists():
            m = re.search(r"\*\*Licen[cs]e\*\*:\s*(.+)", readme.read_text(errors="replace"))
            if m:
                return m.group(1).strip()
    return None


def load_metrics(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Every split's evaluation result in ``metrics/`` (files that declare ``metric_groups``)."""
    out: dict[str, dict[str, Any]] = {}
    for p in sorted((run_dir / "metrics").glob("*.json")):
        try:
            m = json.loads(p.read_text())
        except json.JSONDecodeError:
            log.warning(f"report: {p} is not valid JSON; left out")
            continue
        if isinstance(m, dict) and "split" in m and "metric_groups" in m:
            out[p.stem] = m
    return out


def task_for_folder(run_dir: Path) -> type | None:
    """The task class of a run folder, or of the run an evaluation / explanation folder came from."""
    from medtrust.runs.builders import task_class

    info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    if info.get("kind") == "audit":  # an audit has classifier runs, not one task
        return None
    for cand in [run_dir, info.get("run_dir"), *(info.get("run_dirs") or []), *(info.get("ensemble_runs") or [])]:
        if cand and (Path(cand) / ".hydra" / "config.yaml").is_file() and (Path(cand) / "run.json").is_file():
            try:
                return task_class(Path(cand))
            except Exception as err:  # a report is still written without the task's own sections
                log.warning(f"report: cannot resolve the task of {cand} ({err})")
                return None
    return None


def _metric_rows(metrics: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for split, m in metrics.items():
        row: dict[str, Any] = {"split": split, "n": m.get("n_images", "")}
        row.update(scalar_metrics(m))
        if m.get("in_sample"):
            row["in-sample"] = ", ".join(m["in_sample"])
        rows.append(row)
    return rows


def _data_rows(metrics: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    rows, seen = [], set()
    for s, m in metrics.items():
        d = m.get("data", {})
        key = json.dumps(d, sort_keys=True, default=str)
        if d and key not in seen:
            seen.add(key)
            row = {"evaluated split": s, "source": d.get("source"), "split method": d.get("split_method"),
                   "split sizes": d.get("split_counts"),
                   "licence": dataset_licence(d.get("location")) or "see data set README / phantom (generated)"}
            if d.get("ratings"):  # a rating data set: how many raters and how far they agree
                row["ratings"] = _ratings_text(d["ratings"])
            rows.append(row)
    return rows


def _ratings_text(r: Mapping[str, Any]) -> str:
    a = r.get("agreement") or {}
    alpha = (f"Krippendorff's α ({a.get('level')}) {a['alpha']:.3f}"
             + (f" [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]" if a.get("ci95") else "")
             if a.get("alpha") is not None else f"α undefined ({a.get('reason')})")
    return (f"{r.get('n_ratings')} ratings of {r.get('n_images')} images by {r.get('n_raters')} raters "
            f"(aggregate: {r.get('aggregate')}); {alpha}; per attribute {r.get('images_by_attribute')}")


def limitations(metrics: Mapping[str, Mapping[str, Any]]) -> list[str]:
    out = []
    for split, m in metrics.items():
        data = m.get("data", {})
        src = str(data.get("source", ""))
        n = m.get("n_images", 0)
        if src.startswith("phantom"):
            out.append(f"{split}: procedural phantom data ({src}); figures measure the pipeline, not clinical skill.")
        if isinstance(n, int) and n < 100:
            out.append(f"{split}: only {n} images, so each metric has a wide confidence interval "
                       f"(one image moves a mean by about 1/{n}).")
        if data.get("skipped"):
            out.append(f"{split}: {data['skipped']} bad sample(s) were skipped (data.on_bad=skip).")
        if m.get("in_sample"):
            out.append(f"{split}: {', '.join(m['in_sample'])} are in-sample: what they depend on was fitted on these "
                       "same images.")
        if data.get("image_size"):
            out.append(f"{split}: metrics are computed at the working resolution {data['image_size']} (H, W), "
                       "not at the original image resolution.")
    return list(dict.fromkeys(out))


def _subgroups(metrics: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for split, m in metrics.items():
        sub = m.get("subgroups")
        if not isinstance(sub, Mapping) or not sub.get("attributes"):
            continue
        attrs = []
        for attr, a in sub["attributes"].items():
            gaps = []
            for metric, gp in (a.get("gaps") or {}).items():
                ci = gp.get("ci95")
                gaps.append({"metric": metric, "gap": gp.get("gap"), "95 % CI (highest − lowest)":
                             f"{ci[0]:.3f} – {ci[1]:.3f}" if ci and None not in ci else "",
                             "permutation p": gp.get("p_value"), "ratio (min/max)": gp.get("ratio"),
                             "lowest": gp.get("lowest"), "highest": gp.get("highest")})
            attrs.append({"name": attr, "groups": [{"group": g, **v} for g, v in (a.get("groups") or {}).items()],
                          "gaps": gaps, "small": ", ".join(map(str, a.get("small_groups") or []))})
        out.append({"split": split, "min_group_size": sub.get("min_group_size"), "bootstrap": sub.get("bootstrap"),
                    "attributes": attrs})
    return out


def _mean(d: Any) -> Any:
    return d.get("mean") if isinstance(d, Mapping) else d


def _explanations(run_dir: Path) -> dict[str, Any] | None:
    p = run_dir / "metrics" / "explanations.json"
    if not p.exists():
        return None
    r = json.loads(p.read_text())
    rows = []
    for name in r.get("maps", []):
        loc = (r.get("localisation") or {}).get(name, {})
        fa = (r.get("faithfulness") or {}).get(name, {})
        sa = (r.get("sanity") or {}).get(name, {})
        pg = loc.get("pointing_game") or {}
        rows.append({"map": name, **{k: _mean(loc.get(k)) for k in ("pointing_game", "relevance_mass", "topk_iou",
                                                                      "heatmap_auroc")},
                     "undefined (of n)": f"{pg.get('n_undefined', '')} of {pg.get('n', '')}" if loc else "",
                     "deletion AUC": _mean(fa.get("deletion_auc")), "insertion AUC": _mean(fa.get("insertion_auc")),
                     "sanity ρ": _mean(sa.get("spearman_abs")), "sanity passes": sa.get("passes", "")})
    stab = [{"map": name, "perturbation": pert, **{k: _mean(v) for k, v in met.items()}}
            for name, by in (r.get("stability") or {}).items() for pert, met in by.items()]
    return {"split": r.get("split"), "n_images": r.get("n_images"), "target": json.dumps(r.get("target")),
            "rows": rows, "stability": stab, "undefined": r.get("stability_undefined") or {}}


def _figures(run_dir: Path) -> list[dict[str, Any]]:
    root = run_dir / "figures"
    if not root.exists():
        return []
    return [{"folder": str(folder.relative_to(root)),
             "images": [{"path": p, "caption": p.stem.replace("_", " ")} for p in sorted(folder.glob("*.png"))]}
            for folder in sorted({p.parent for p in root.rglob("*.png")})
            if folder.relative_to(root).parts[:1] != ("audit",)]  # shown by the audit section itself


def build_run_report(run_dir: str | Path, task: Any = None, title: str | None = None) -> Path:
    """Write ``<run_dir>/report/index.html`` from the folder's contents and return its path.

    Args:
        run_dir: a run, evaluation, explanation or comparison folder.
        task: the task (class or instance) whose trust lines and sections the report shows; None =
            resolved from the folder (its run's ``model._target_``, checked against the allow-list).
        title: the page title.
    """
    run_dir = Path(run_dir)
    cls = (task if isinstance(task, type) else type(task)) if task is not None else task_for_folder(run_dir)
    metrics = load_metrics(run_dir)
    info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    title = title or "medtrust trust report"
    S = ReportSection
    sections = [S("header.html.j2", {"title": title, "run_dir": str(run_dir), "info": info,
                                     "intended_use": INTENDED_USE})]
    lines = [asdict(x) for x in cls.trust_summary(run_dir, metrics)] if cls is not None else []
    sections.append(S("trust_summary.html.j2", {"lines": lines, "task": getattr(cls, "task_name", None)}))
    if metrics:
        sections.append(S("metrics.html.j2", {"rows": _metric_rows(metrics), "data": _data_rows(metrics)}))
    if cls is not None:
        sections += cls.report_sections(run_dir, metrics)
    audit_json = run_dir / "metrics" / "audit.json"
    if audit_json.is_file():  # an audit folder (evaluate.py audit=<name>)
        from medtrust.report.audit import audit_sections

        sections += audit_sections(run_dir, json.loads(audit_json.read_text()))
    subgroups = _subgroups(metrics)
    if subgroups:
        sections.append(S("subgroups.html.j2", {"splits": subgroups}))
    expl = _explanations(run_dir)
    if expl:
        sections.append(S("explanations.html.j2", expl))
    splits_json = run_dir / "splits" / "splits.json"
    if splits_json.exists():
        sections.append(S("splits.html.j2", {"splits": json.loads(splits_json.read_text())}))
    figs = _figures(run_dir)
    if figs:
        sections.append(S("figures.html.j2", {"folders": figs}))
    if (run_dir / "comparison.csv").exists():
        sections.append(S("comparison.html.j2", {"rows": pd.read_csv(run_dir / "comparison.csv").to_dict("records")}))
    lim_sources = dict(metrics)
    cmp_json = run_dir / "metrics" / "comparison.json"
    if cmp_json.exists():  # a comparison page: limitations of the data the runs were compared on
        c = json.loads(cmp_json.read_text())
        d = c.get("data", {})
        lim_sources["comparison"] = {"data": d, "n_images": (d.get("split_counts") or {}).get(c.get("split"), 0)}
    lim = limitations(lim_sources)
    if lim:
        sections.append(S("limitations.html.j2", {"items": lim}))
    if (run_dir / "config.yaml").exists():
        sections.append(S("config.html.j2", {"text": (run_dir / "config.yaml").read_text()}))
    body = [render(s) for s in sections]
    page = environment().get_template("page.html.j2").render(title=title, css=Markup(CSS), sections=body)
    return atomic_write_bytes(run_dir / "report" / "index.html", page.encode())
