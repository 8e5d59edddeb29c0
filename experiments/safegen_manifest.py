"""Write the real chest X-ray manifest of SAFEGEN's real case from ../shared/data: every Kermany
(paediatric) and ieee8023 (adult, COVID-19 and other findings, PA/AP/lateral) image — the detector learns
"real", not "healthy".

    python experiments/safegen_manifest.py --out runs/safegen_manifest
    python train.py experiment=safegen_real            # reads runs/safegen_manifest/manifest.csv

Columns: ``path`` (absolute: the images stay where they are), ``patient_id``, ``dataset``, ``finding``,
``view``, ``split``. Splits keep the sources' patient-disjoint splits: the sources' ``val`` rows are the
held-out ``test`` rows (the artifact benchmark is injected into them); of the sources' ``train`` patients a
seeded ``--val-fraction`` becomes ``val`` (model selection and the clean-image statistics), the rest
``train``. The data is never copied into the repository: ``--out`` must lie outside it or under its
git-ignored ``runs/``; an existing manifest is never overwritten.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"kermany": "pediatric_pneumonia_cxr_kermany", "ieee8023": "covid_chestxray_ieee8023"}


def _fail(msg: str) -> None:
    sys.exit(f"safegen_manifest: {msg}")


def _val(patient: str, seed: int, fraction: float) -> bool:
    h = int(hashlib.sha256(f"{seed}:{patient}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return h < fraction


def rows(shared: Path, seed: int, val_fraction: float) -> pd.DataFrame:
    out = []
    for name, folder in SOURCES.items():
        path = shared / folder / "manifest.csv"
        if not path.is_file():
            _fail(f"{path} not found; expected ../shared/data/{folder} (pass --shared <data folder>)")
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
        missing = {"path", "patient_id", "label", "split"} - set(df.columns)
        if missing:
            _fail(f"{path}: missing column(s) {sorted(missing)}")
        for i, r in df.iterrows():
            if r["split"] not in ("train", "val"):
                _fail(f"{path} row {i + 2}: split {r['split']!r}, expected train or val")
            img = (path.parent / r["path"]).resolve()
            split = "test" if r["split"] == "val" else ("val" if _val(r["patient_id"], seed, val_fraction) else "train")
            out.append({"path": str(img), "patient_id": r["patient_id"], "dataset": name, "finding": r["label"],
                        "view": r.get("view", ""), "split": split})
    return pd.DataFrame(out)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (outside the repository, or under runs/)")
    p.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--val-fraction", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    shared, out = Path(a.shared).resolve(), Path(a.out).resolve()
    inside = out == ROOT or ROOT in out.parents
    if inside and not (out == ROOT / "runs" or (ROOT / "runs") in out.parents):
        _fail(f"--out {out} is inside the repository; the shared data must not be copied into it "
              "(use a folder outside it, or under runs/, which git ignores)")
    if not 0 < a.val_fraction < 1:
        _fail(f"--val-fraction {a.val_fraction}: expected 0 < fraction < 1")
    manifest = out / "manifest.csv"
    if manifest.exists():
        _fail(f"{manifest} exists; choose another --out (manifests are never overwritten)")
    df = rows(shared, a.seed, a.val_fraction)
    out.mkdir(parents=True, exist_ok=True)
    tmp = manifest.with_suffix(".csv.tmp")
    df.to_csv(tmp, index=False)
    tmp.replace(manifest)
    counts = df.groupby(["split", "dataset"]).size().unstack(fill_value=0)
    print(f"{manifest}: {len(df)} images, {df.patient_id.nunique()} patients\n{counts}")
    return manifest


if __name__ == "__main__":
    main()
