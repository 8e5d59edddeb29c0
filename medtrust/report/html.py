"""One self-contained HTML trust report per run folder (images embedded as base64).

The report is built from what is on disk (``metrics/*.json``, ``figures/**.png``, ``splits/``,
``config.yaml``), so it covers whatever the run produced and can be rebuilt at any time.
"""
from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from medtrust.report.summary import scalar_metrics
from medtrust.utils.io import atomic_write_bytes

INTENDED_USE = (
    "Research tool for studying the trustworthiness of medical-imaging models. It is <b>not a medical "
    "device</b> and must not be used for diagnosis, treatment or any clinical decision. Results on phantom "
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
"""


def _img(path: Path, caption: str, width: int | None = None) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    size = f" width={width}" if width else ""
    return (f'<figure><img alt="{html.escape(caption)}"{size} src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _table(rows: list[Mapping[str, Any]], digits: int = 4) -> str:
    if not rows:
        return ""
    cols = list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.{digits}f}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{fmt(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


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


def _metric_rows(metrics: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for split, m in metrics.items():
        row: dict[str, Any] = {"split": split, "n": m.get("n_images", "")}
        row.update(scalar_metrics(m))
        rows.append(row)
    return rows


def _limitations(metrics: Mapping[str, Mapping[str, Any]]) -> list[str]:
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
        if data.get("image_size"):
            out.append(f"{split}: metrics are computed at the working resolution {data['image_size']} (H, W), "
                       "not at the original image resolution.")
    return list(dict.fromkeys(out))


def _mean(d: Any) -> Any:
    return d.get("mean") if isinstance(d, Mapping) else d


def _explanation_sections(run_dir: Path) -> list[str]:
    """Localisation / faithfulness / sanity / stability tables from ``metrics/explanations.json``."""
    p = run_dir / "metrics" / "explanations.json"
    if not p.exists():
        return []
    r = json.loads(p.read_text())
    rows = []
    for name in r.get("maps", []):
        loc = r.get("localisation", {}).get(name, {})
        fa = r.get("faithfulness", {}).get(name, {})
        sa = r.get("sanity", {}).get(name, {})
        rows.append({"map": name, **{k: _mean(loc.get(k)) for k in ("pointing_game", "relevance_mass", "topk_iou",
                                                                      "heatmap_auroc")},
                     "undefined (of n)": f"{(loc.get('pointing_game') or {}).get('n_undefined', '')} of "
                                         f"{(loc.get('pointing_game') or {}).get('n', '')}" if loc else "",
                     "deletion AUC": _mean(fa.get("deletion_auc")), "insertion AUC": _mean(fa.get("insertion_auc")),
                     "sanity ρ": _mean(sa.get("spearman_abs")), "sanity passes": sa.get("passes", "")})
    out = [f"<h2>Explanations ({r.get('n_images')} images, {html.escape(str(r.get('split')))} split, target "
           f"{html.escape(json.dumps(r.get('target')))})</h2>" + _table(rows, 3)]
    stab = [{"map": name, "perturbation": pert, **{k: _mean(v) for k, v in met.items()}}
            for name, by in r.get("stability", {}).items() for pert, met in by.items()]
    if stab:
        out.append("<h3>Stability against the unperturbed map</h3>" + _table(stab, 3))
    return out


def _subgroup_sections(metrics: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Per split and attribute: groups x metrics, then the gaps with their bootstrap CIs."""
    out = []
    for split, m in metrics.items():
        sub = m.get("subgroups")
        if not isinstance(sub, Mapping) or not sub.get("attributes"):
            continue
        out.append(f"<h2>Subgroups ({html.escape(split)}): is the error spread evenly?</h2>"
                   f"<p class=muted>Groups smaller than {sub.get('min_group_size')} images are listed but not in the "
                   f"gaps. gap = highest − lowest group; 95 % CI = stratified bootstrap of that pair's signed "
                   f"difference ({sub.get('bootstrap')} resamples; containing 0 = no evidence for that pair); "
                   "permutation p = chance of a gap this large among groups that do not differ (accounts for "
                   "picking the extreme pair). Prevalence gaps describe the data, not the model.</p>")
        for attr, a in sub["attributes"].items():
            groups = [{"group": g, **vals} for g, vals in a.get("groups", {}).items()]
            gaps = []
            for metric, gp in a.get("gaps", {}).items():
                ci = gp.get("ci95")
                gaps.append({"metric": metric, "gap": gp.get("gap"), "95 % CI (highest − lowest)":
                             f"{ci[0]:.3f} – {ci[1]:.3f}" if ci and None not in ci else "",
                             "permutation p": gp.get("p_value", ""), "ratio (min/max)": gp.get("ratio"),
                             "lowest": gp.get("lowest"), "highest": gp.get("highest")})
            small = a.get("small_groups") or []
            out.append(f"<h3>{html.escape(attr)}</h3>" + _table(groups, 3) + (_table(gaps, 3) if gaps else
                       "<p class=muted>fewer than two groups large enough for a gap</p>")
                       + (f"<p class=muted>small groups: {html.escape(', '.join(map(str, small)))}</p>" if small else ""))
    return out


def _failure_sections(run_dir: Path, metrics: Mapping[str, Mapping[str, Any]], k: int = 8) -> list[str]:
    """Classifier: the exported failure cases (most confident errors, most uncertain correct) as
    thumbnails; segmenter: the worst images by Dice with their per-image scores and the worst batch."""
    out = []
    for split, m in metrics.items():
        index = run_dir / "failure_cases" / split / "index.csv"
        if index.exists():
            df = pd.read_csv(index)
            out.append(f"<h2>Failure cases ({html.escape(split)})</h2>")
            for kind, sub in df.groupby("kind", sort=False):
                figs = []
                for _, r in sub.iterrows():
                    img = index.parent / str(r["file"])
                    if img.exists():
                        figs.append(_img(img, f"{r['id']}: y={r['label']} pred={r['pred']} "
                                              f"p={r['confidence']:.2f} H={r['entropy']:.2f}", width=128))
                out.append(f"<h3>{html.escape(str(kind).replace('_', ' '))} ({len(sub)})</h3>" + "".join(figs))
            continue
        per = run_dir / "metrics" / f"{split}_per_image.csv"
        if m.get("task") == "segmentation" and per.exists():
            df = pd.read_csv(per).sort_values("dice", na_position="first").head(k)
            cols = [c for c in df.columns if c not in ("path",)]
            out.append(f"<h2>Failure cases ({html.escape(split)}): the {len(df)} lowest-Dice images</h2>"
                       + _table(df[cols].to_dict("records"), 3))
            worst = run_dir / "figures" / split / "batch_c_worst.png"
            if worst.exists():
                out.append(_img(worst, f"{split}: worst batch (image, ground truth, prediction)"))
    return out


# Sections from what later tasks write (anomaly maps, generated samples, audits) register here:
# each takes (run_dir, metrics by split) and returns HTML fragments; they go after the built-in ones.
EXTRA_SECTIONS: list[Any] = []


def build_run_report(run_dir: str | Path, title: str | None = None) -> Path:
    """Write ``<run_dir>/report/index.html`` from the folder's contents and return its path."""
    run_dir = Path(run_dir)
    metrics: dict[str, dict[str, Any]] = {}
    for p in sorted((run_dir / "metrics").glob("*.json")):
        try:
            m = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
        if isinstance(m, dict) and "split" in m and any(g in m for g in ("seg", "cls")):
            metrics[p.stem] = m
    info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    parts = [f"<h1>{html.escape(title or 'medtrust trust report')}</h1>",
             f"<p class=muted>{html.escape(str(run_dir))}<br>created {html.escape(str(info.get('created', '')))}"
             f" · git {html.escape(str(info.get('git_commit', '')))}<br>command: "
             f"<code>{html.escape(str(info.get('command', '')))}</code></p>",
             f"<div class=box><b>Intended use.</b> {INTENDED_USE}</div>"]

    if metrics:
        parts.append("<h2>Metrics</h2>" + _table(_metric_rows(metrics)))
        ta = [{"split": s, **m["threshold_analysis"]} for s, m in metrics.items() if m.get("threshold_analysis")]
        if ta:
            parts.append("<h3>Threshold analysis</h3>" + _table(ta))
        data_rows, seen = [], set()
        for s, m in metrics.items():
            d = m.get("data", {})
            key = json.dumps(d, sort_keys=True, default=str)
            if d and key not in seen:
                seen.add(key)
                lic = dataset_licence(d.get("location"))
                data_rows.append({"evaluated split": s, "source": d.get("source"), "split method": d.get("split_method"),
                                  "split sizes": d.get("split_counts"), "licence": lic or "see data set README / phantom (generated)"})
        parts.append("<h2>Data</h2>" + _table(data_rows))
    quad = [{"split": sp, **m["quadrants"]["counts"], "confidence threshold": m["quadrants"].get("confidence_threshold")}
            for sp, m in metrics.items() if isinstance(m.get("quadrants"), dict) and "counts" in m["quadrants"]]
    if quad:
        parts.append("<h2>Trust quadrants</h2>" + _table(quad))
        for sp, m in metrics.items():
            st = (m.get("quadrants") or {}).get("stability")
            if st:
                parts.append(f"<h3>{html.escape(sp)}: correct × confident × stable explanation "
                             f"({html.escape(str(st.get('method')))}, threshold {st.get('threshold')})</h3>"
                             + _table([{k: v for k, v in st["counts"].items() if v}]))
    parts += _subgroup_sections(metrics)
    parts += _explanation_sections(run_dir)
    parts += _failure_sections(run_dir, metrics)
    for section in EXTRA_SECTIONS:
        parts += section(run_dir, metrics)
    splits_json = run_dir / "splits" / "splits.json"
    if splits_json.exists():
        sj = json.loads(splits_json.read_text())
        parts.append(f"<p class=muted>splits: method {html.escape(str(sj.get('method')))}, sha256 "
                     f"<code>{html.escape(str(sj.get('sha256')))}</code>, counts {html.escape(json.dumps(sj.get('counts')))}</p>")

    fig_root = run_dir / "figures"
    if fig_root.exists():
        parts.append("<h2>Figures</h2>")
        for folder in sorted({p.parent for p in fig_root.rglob("*.png")}):
            parts.append(f"<h3>{html.escape(str(folder.relative_to(fig_root)))}</h3>")
            parts += [_img(p, p.stem.replace('_', ' ')) for p in sorted(folder.glob("*.png"))]

    for name in ("comparison.csv",):
        p = run_dir / name
        if p.exists():
            parts.append("<h2>Comparison</h2>" + _table(pd.read_csv(p).to_dict("records")))

    lim_sources = dict(metrics)
    cmp_json = run_dir / "metrics" / "comparison.json"
    if cmp_json.exists():  # a comparison page: limitations of the data the runs were compared on
        c = json.loads(cmp_json.read_text())
        d = c.get("data", {})
        lim_sources["comparison"] = {"data": d, "n_images": (d.get("split_counts") or {}).get(c.get("split"), 0)}
    lim = _limitations(lim_sources)
    if lim:
        parts.append("<h2>Known limitations</h2><ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in lim) + "</ul>")
    cfg = run_dir / "config.yaml"
    if cfg.exists():
        parts.append(f"<h2>Configuration</h2><details><summary>resolved config</summary><pre>"
                     f"{html.escape(cfg.read_text())}</pre></details>")
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title or 'medtrust report')}</title>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>")
    return atomic_write_bytes(run_dir / "report" / "index.html", page.encode())
