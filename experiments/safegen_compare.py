"""SAFEGEN's comparison table: every detector against a reference detector on the same benchmark images.

    python experiments/safegen_compare.py ddpm=<run> ae=<run> [full_chain=<evaluation folder>] \
        [--reference ddpm] [--split test] [--out compare.json]

Each ``name=folder`` is a run or an evaluation folder holding ``metrics/<split>_benchmark.csv`` (written
by train.py / evaluate.py on the artifact benchmark). A folder gives two detectors: ``name`` (the top-k %
z-residual) and ``name raw`` (the same residual, not z-scored). Rows are matched by benchmark image id;
a folder scored on a subset (the full DDPM chain) is compared with the reference on that subset only,
and says so. For every detector: image AUROC with its bootstrap 95 % CI, overall and per cohort; against
the reference: ΔAUROC with a paired bootstrap CI and the Wilcoxon signed-rank p of the injected images'
placement values (:func:`medtrust.metrics.anomaly.compare_detectors`). Prints markdown; ``--out`` writes
the figures as JSON (atomically, never over an existing file).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from medtrust.metrics.anomaly import auroc_with_ci, compare_detectors  # noqa: E402
from medtrust.utils.io import write_json  # noqa: E402

COLUMNS = {"": "score", " raw": "score_raw_residual"}


def _load(name: str, folder: str, split: str) -> pd.DataFrame:
    path = Path(folder) / "metrics" / f"{split}_benchmark.csv"
    if not path.is_file():
        raise SystemExit(f"{name}={folder}: {path} missing (expected a SAFEGEN run or evaluation folder)")
    df = pd.read_csv(path)
    missing = {"id", "label", "cohort", "score"} - set(df.columns)
    if missing:
        raise SystemExit(f"{path}: missing column(s) {sorted(missing)}")
    if df.id.duplicated().any():
        raise SystemExit(f"{path}: duplicate image ids (e.g. {df.id[df.id.duplicated()].iloc[0]!r})")
    return df.set_index("id")


def _ci(ci: Any) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


def compare(folders: dict[str, str], reference: str, split: str = "test", n_boot: int = 1000,
            seed: int = 0) -> dict[str, Any]:
    frames = {n: _load(n, f, split) for n, f in folders.items()}
    if reference not in frames:
        raise SystemExit(f"--reference {reference}: not one of {list(frames)}")
    ref = frames[reference]
    out: dict[str, Any] = {"split": split, "reference": reference, "folders": folders, "detectors": {}}
    for name, df in frames.items():
        common = ref.index.intersection(df.index)
        if len(common) == 0:
            raise SystemExit(f"{name}: no benchmark image in common with {reference} (another benchmark seed or split?)")
        r, d = ref.loc[common], df.loc[common]
        if not (r.label.values == d.label.values).all():
            raise SystemExit(f"{name}: the labels of the common images differ from {reference}'s")
        subset = len(common) < len(ref)
        for suffix, col in COLUMNS.items():
            if col not in d.columns:
                continue
            det = f"{name}{suffix}"
            y = d.label.values
            row: dict[str, Any] = {"n_images": int(len(common)), "subset": subset,
                                   "evaluations_per_image": None, "overall": {}, "cohorts": {}}
            a, ci = auroc_with_ci(d[col].values, y, n_boot, seed)
            row["overall"] = {"auroc": a, "auroc_ci": ci}
            for c in sorted(set(d.cohort[y == 1])):
                sel = ((d.cohort == c) | (y == 0)).values
                a, ci = auroc_with_ci(d[col].values[sel], y[sel], n_boot, seed)
                row["cohorts"][c] = {"auroc": a, "auroc_ci": ci}
            if det != reference:
                row["vs_reference"] = compare_detectors(d[col].values, r["score"].values, y, n_boot, seed)
                if subset:
                    ra, rci = auroc_with_ci(r["score"].values, y, n_boot, seed)
                    row["reference_on_subset"] = {"auroc": ra, "auroc_ci": rci}
            m = Path(folders[name]) / "metrics" / f"{split}.json"
            if m.is_file():
                row["evaluations_per_image"] = (json.loads(m.read_text()).get("reconstruction") or {}).get("evaluations_per_image")
            out["detectors"][det] = row
    return out


def markdown(res: dict[str, Any]) -> str:
    dets = res["detectors"]
    cohorts = sorted({c for d in dets.values() for c in d["cohorts"]})
    head = ["detector", "images", "evals/img", "AUROC [95 % CI]", *cohorts, f"Δ vs {res['reference']} [95 % CI]",
            "Wilcoxon p"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, d in dets.items():
        o, v = d["overall"], d.get("vs_reference")
        delta = f"{v['diff']:+.3f} {_ci(v['diff_ci'])}" if v else "reference"
        if d.get("subset"):
            delta += f" (on this subset; {res['reference']} {d['reference_on_subset']['auroc']:.3f})"
        p = v["wilcoxon"]["p"] if v else None
        lines.append("| " + " | ".join([
            name, str(d["n_images"]), "" if d["evaluations_per_image"] is None else str(d["evaluations_per_image"]),
            f"{o['auroc']:.3f} {_ci(o['auroc_ci'])}", *(f"{d['cohorts'][c]['auroc']:.3f}" if c in d["cohorts"] else ""
                                                      for c in cohorts),
            delta, "" if p is None else f"{p:.2g}"]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", help="name=folder (a SAFEGEN run or evaluation folder)")
    ap.add_argument("--reference", default=None, help="the detector the others are compared with (default: the first)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--out", default=None, help="write the figures as JSON here (must not exist)")
    args = ap.parse_args(argv)
    folders: dict[str, str] = {}
    for item in args.folders:
        if "=" not in item:
            raise SystemExit(f"{item!r}: expected name=folder")
        n, f = item.split("=", 1)
        if n in folders:
            raise SystemExit(f"{n}: named twice")
        folders[n] = f
    res = compare(folders, args.reference or next(iter(folders)), args.split, args.bootstrap)
    print(markdown(res))
    if args.out:
        if Path(args.out).exists():
            raise SystemExit(f"{args.out} exists; results are never overwritten")
        write_json(args.out, res)


if __name__ == "__main__":
    main()
