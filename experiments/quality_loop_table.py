"""The README tables of MINIM's quality loop, read from the ``metrics/quality_loop.json`` of one or more
``experiment=minim_quality`` runs (nothing is recomputed: every figure is the run's own).

    python experiments/quality_loop_table.py <loop run> [<loop run> ...] [--filtering <loop run>]

Prints, as markdown: one row per run (selector accuracy against the known quality, the top-rated share
before -> after with the paired prompt-cluster CI and sign-flip p, the selector's own top share, modality
and finding accuracy and MS-SSIM before -> after), the per-modality table of the first run, and what the
selector's filter keeps per modality, sex and age group (of the ``--filtering`` run, default the first), with
each group's share of images top-rated by the known quality and the share of those the filter keeps.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Mapping


def _load(run: str) -> dict[str, Any]:
    path = Path(run) / "metrics" / "quality_loop.json"
    if not path.is_file():
        raise SystemExit(f"{path}: missing (expected the metrics of a finished `train.py experiment=minim_quality` run)")
    return json.loads(path.read_text())


def _ci(ci: Any, digits: int = 3) -> str:
    return f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else ""


def _num(x: Any, fmt: str = ".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _pair(d: Mapping[str, Any]) -> str:
    return (f"{d['before']:.3f} → {d['after']:.3f}, **{d['diff']:+.3f}** {_ci(d.get('diff_ci'))}"
            f" (p {d.get('p_permutation', float('nan')):.4f})")


def headline(runs: list[str]) -> str:
    lines = ["| run | selector accuracy vs known quality | top-rated share (known quality) | selector's top share "
             "| modality accuracy | finding accuracy | MS-SSIM | prompts × samples |",
             "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        q = _load(run)
        acc = q["selector_accuracy"]
        div = q.get("diversity_ms_ssim") or {}
        ms = (f"{div['before']['ms_ssim']:.3f} → {div['after']['ms_ssim']:.3f}" if div else "")
        top = q["top_rated_share"]
        lines.append(f"| `{run}` | {acc['value']:.3f} {_ci(acc.get('ci95'))} (n {acc['n']}) | {_pair(top)} "
                     f"| {_pair(q['selector_top_share'])} | {_pair(q['modality_accuracy'])} "
                     f"| {_pair(q['finding_accuracy'])} | {ms} | {top['n_prompts']} × {top['n_images'] // top['n_prompts']} |")
    return "\n".join(lines)


def per_modality(run: str) -> str:
    q = _load(run)
    per = q.get("per_modality") or {}
    if not per:
        return f"(no per_modality in {run})"
    keys = list(next(iter(per.values()))["before"])
    lines = ["| modality | n | " + " | ".join(f"{k} before → after" for k in keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    for m, d in per.items():
        cells = []
        for k in keys:
            b, a = d["before"].get(k), d["after"].get(k)
            cells.append(f"{b:.3f} → {a:.3f}" if isinstance(b, (int, float)) and isinstance(a, (int, float)) else f"{b} → {a}")
        lines.append(f"| {m} | {d['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def recognised(run: str) -> str:
    """Per modality and stage, the images the judge recognises as their modality against those it does not:
    their number, mean selector score, mean known rating and top-rated share (from quality_loop_images.csv).
    A gain of the reward that comes with images the judge no longer recognises is a gain bought by drifting
    away from the modality, not by quality."""
    import pandas as pd

    path = Path(run) / "metrics" / "quality_loop_images.csv"
    if not path.is_file():
        return f"({path} missing)"
    d = pd.read_csv(path)
    if "rating_before" not in d or "modality_correct_before" not in d:
        return "(no known rating or modality judge in this run)"
    lines = ["| modality | stage | recognised: n, selector, known, top-rated | not recognised: n, selector, known, top-rated |",
             "|---|---|---|---|"]
    top = int(d[["rating_before", "rating_after"]].max().max())

    def cell(x: "pd.DataFrame", stage: str) -> str:
        if not len(x):
            return "0"
        return (f"{len(x)}, {x[f'selector_score_{stage}'].mean():.2f}, {x[f'rating_{stage}'].mean():.2f}, "
                f"{(x[f'rating_{stage}'] == top).mean():.3f}")

    for m, g in d.groupby("modality"):
        for stage in ("before", "after"):
            ok = g[f"modality_correct_{stage}"].astype(bool)
            lines.append(f"| {m} | {stage} | {cell(g[ok], stage)} | {cell(g[~ok], stage)} |")
    for stage in ("before", "after"):
        ok = d[f"modality_correct_{stage}"].astype(bool)
        lines.append(f"| all | {stage} | {cell(d[ok], stage)} | {cell(d[~ok], stage)} |")
    return "\n".join(lines)


def filtering(run: str, stage: str = "before", attributes: tuple[str, ...] = ("modality", "sex", "age_group")) -> str:
    q = _load(run)
    f = q["filtering"][stage]
    lines = [f"{stage}: {f['n_kept']} of {f['n']} images kept (selector score ≥ {q['keep_min_score']}), "
             f"keep rate {_num(f['keep_rate'])} {_ci(f.get('keep_rate_ci'))}", "",
             "| attribute | group | n | keep rate | share of all → of kept | change [95 % CI] | χ² p "
             "| top-rated (known) | top-rated kept (recall) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for attr in attributes:
        a = f["attributes"].get(attr)
        if not a:
            continue
        p = a.get("chi2_p", a.get("p_chi2"))
        for i, (g, d) in enumerate(a["groups"].items()):
            lines.append(f"| {attr if i == 0 else ''} | {g} | {d['n']} | {_num(d['keep_rate'])} {_ci(d.get('keep_rate_ci'), 2)} "
                         f"| {_num(d['share_all'])} → {_num(d['share_kept'])} | {_num(d['share_change'], '+.3f')} "
                         f"{_ci(d.get('share_change_ci'))} | {'' if i or p is None else f'{p:.2g}'} "
                         f"| {_num(d.get('truth_rate'))} {_ci(d.get('truth_rate_ci'), 2)} "
                         f"| {_num(d.get('recall'))} {_ci(d.get('recall_ci'), 2)} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="experiment=minim_quality run folders")
    p.add_argument("--filtering", help="the run whose filtering table is printed (default: the first)")
    args = p.parse_args()
    print(headline(args.runs), "", per_modality(args.runs[0]), "", recognised(args.runs[0]), "", sep="\n")
    run = args.filtering or args.runs[0]
    for stage in ("before", "after"):
        if stage in _load(run)["filtering"]:
            print(filtering(run, stage), "", sep="\n")


if __name__ == "__main__":
    main()
