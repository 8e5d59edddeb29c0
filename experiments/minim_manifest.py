"""Write the real image-text manifest of the generator (``path,text,modal`` + attributes) from ../shared/data.

    python experiments/minim_manifest.py --out runs/minim_manifest          # PH2 + Kermany + PneumoniaMNIST
    python experiments/minim_manifest.py --out <folder> --with-ieee8023     # also the ieee8023 COVID CXRs
    python train.py experiment=minim_real data.manifest=runs/minim_manifest/manifest.csv model.vae_run=<vae run>

Modalities: ``dermoscopy`` (PH2: diagnosis in the text) and ``cxr`` (Kermany paediatric CXRs and
PneumoniaMNIST: finding, subtype, paediatric age band, view; neither records sex or age per image).
ieee8023 is left out by default: the bias/hallucination audit trains its independent COVID classifier
on it, and its hallucination design needs a generator that never saw COVID. CT and MR exist here only
as phantoms (``phantom_multimodal``): the seven DICOM samples of ../shared/data are for I/O tests.

``label`` is a global finding class over (modality, finding), listed in ``classes.json``:
0 dermoscopy common nevus, 1 dermoscopy atypical nevus, 2 dermoscopy melanoma, 3 cxr normal,
4 cxr pneumonia (5 cxr COVID-19, 6 cxr other finding with --with-ieee8023). Splits are the source
splits (patient-disjoint there). Images are referenced where they are (PH2, Kermany, ieee8023);
PneumoniaMNIST's npz arrays are written as PNGs under ``<out>/pneumoniamnist/`` (a seeded subset of
``--pneumoniamnist-max`` per split, so the 4,594 28-px images do not swamp the 500 others). The data
is never copied into the repository: ``--out`` must lie outside it or under its git-ignored ``runs/``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["dermoscopy: common nevus", "dermoscopy: atypical nevus", "dermoscopy: melanoma",
           "cxr: normal", "cxr: pneumonia", "cxr: COVID-19", "cxr: other finding"]
PH2_TEXT = {"common_nevus": "common nevus", "atypical_nevus": "atypical nevus", "melanoma": "melanoma"}


def _fail(msg: str) -> None:
    sys.exit(f"minim_manifest: {msg}")


def _read(shared: Path, name: str) -> pd.DataFrame:
    path = shared / name / "manifest.csv"
    if not path.is_file():
        _fail(f"{path} not found; expected ../shared/data/{name} (pass --shared <data folder>)")
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _cxr_text(finding: str, extra: str, view: str, template: str) -> str:
    view = "" if not view or "not recorded" in view else f", {view} view"
    if template == "report":
        impression = "normal study" if finding == "normal" else f"abnormal, {finding}"
        body = "no pneumonia" if finding == "normal" else f"{finding}{extra}"
        return (f"History: paediatric patient. Technique: chest X-ray{view}. Findings: {body}. "
                f"Impression: {impression}.")
    return f"chest X-ray: {'no pneumonia' if finding == 'normal' else finding + extra}, paediatric{view}"


def ph2_rows(shared: Path, template: str) -> list[dict]:
    df, base = _read(shared, "ph2_skin_lesion_seg"), shared / "ph2_skin_lesion_seg"
    rows = []
    for i, r in df.iterrows():
        diag = PH2_TEXT.get(r["label"])
        if diag is None:
            _fail(f"{base / 'manifest.csv'} row {i + 2}: unknown PH2 label {r['label']!r}; expected {list(PH2_TEXT)}")
        text = (f"History: skin lesion. Technique: dermoscopy. Findings: {diag}. Impression: {diag}."
                if template == "report" else f"dermoscopy: {diag}")
        rows.append({"path": str((base / r["path"]).resolve()), "text": text, "modal": "dermoscopy",
                     "label": CLASSES.index(f"dermoscopy: {diag}"), "patient_id": f"ph2_{r['patient_id']}",
                     "split": r["split"], "source": "ph2", "sex": r["sex"] or "unknown", "age_group": "unknown",
                     "view": "dermoscopic"})
    return rows


def kermany_rows(shared: Path, template: str) -> list[dict]:
    df, base = _read(shared, "pediatric_pneumonia_cxr_kermany"), shared / "pediatric_pneumonia_cxr_kermany"
    rows = []
    for _, r in df.iterrows():
        finding = "pneumonia" if r["label"] == "pneumonia" else "normal"
        extra = f" ({r['subtype']})" if finding == "pneumonia" and r["subtype"] else ""
        rows.append({"path": str((base / r["path"]).resolve()), "text": _cxr_text(finding, extra, r["view"], template),
                     "modal": "cxr", "label": CLASSES.index(f"cxr: {finding}"), "patient_id": r["patient_id"],
                     "split": r["split"], "source": "kermany", "sex": r["sex"] or "unknown",
                     "age_group": "paediatric", "view": r["view"] or "unknown"})
    return rows


def pneumoniamnist_rows(shared: Path, out: Path, template: str, per_split: int, seed: int) -> list[dict]:
    df = _read(shared, "pneumoniamnist_28")
    npz = shared / "pneumoniamnist_28" / "pneumoniamnist_28.npz"
    arrays = np.load(npz, allow_pickle=False)
    folder = out / "pneumoniamnist"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for split, part in df.groupby("split", sort=True):
        pick = np.random.default_rng([seed, len(split)]).permutation(len(part))[:per_split]
        for _, r in part.iloc[np.sort(pick)].iterrows():
            key, idx = r["array_key"], int(r["index"])
            png = folder / f"{key}_{idx:05d}.png"
            if not png.exists():
                tmp = png.with_suffix(".tmp.png")
                Image.fromarray(np.asarray(arrays[key][idx], dtype=np.uint8)).save(tmp)
                os.replace(tmp, png)
            finding = "pneumonia" if r["label"] == "pneumonia" else "normal"
            rows.append({"path": str(png.resolve()), "text": _cxr_text(finding, "", "", template), "modal": "cxr",
                         "label": CLASSES.index(f"cxr: {finding}"),
                         "patient_id": f"pmnist_{key}_{idx}",  # no patient ids in MedMNIST: one image, one patient
                         "split": r["split"], "source": "pneumoniamnist", "sex": "unknown",
                         "age_group": "paediatric", "view": "unknown"})
    return rows


def ieee8023_rows(shared: Path, template: str) -> list[dict]:
    df, base = _read(shared, "covid_chestxray_ieee8023"), shared / "covid_chestxray_ieee8023"
    rows = []
    for _, r in df.iterrows():
        covid = r["covid"] == "1"
        finding = "COVID-19" if covid else ("normal" if r["label"].lower() in ("no finding", "normal") else "other finding")
        extra = "" if covid or finding == "normal" else f" ({r['label']})"
        age = r["age"]
        group = "unknown" if not age else "<40" if float(age) < 40 else "40-65" if float(age) <= 65 else ">65"
        text = _cxr_text(finding, extra, r["view"], template).replace(", paediatric", "")
        rows.append({"path": str((base / r["path"]).resolve()), "text": text, "modal": "cxr",
                     "label": CLASSES.index(f"cxr: {finding}"), "patient_id": r["patient_id"], "split": r["split"],
                     "source": "ieee8023", "sex": r["sex"] or "unknown", "age_group": group,
                     "view": r["view"] or "unknown"})
    return rows


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"), help="the shared data folder")
    p.add_argument("--out", required=True, help="output folder (outside the repository, or under runs/)")
    p.add_argument("--template", choices=("short", "report"), default="short")
    p.add_argument("--pneumoniamnist-max", type=int, default=300, help="PneumoniaMNIST images per split (0: none)")
    p.add_argument("--with-ieee8023", action="store_true", help="add the ieee8023 COVID CXRs (off: see above)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    shared, out = Path(a.shared).resolve(), Path(a.out).resolve()
    if not shared.is_dir():
        _fail(f"shared data folder {shared} not found (pass --shared)")
    inside = out == ROOT or ROOT in out.parents
    if inside and not (out == ROOT / "runs" or (ROOT / "runs") in out.parents):
        _fail(f"--out {out} is inside the repository; the shared data must not be copied into it "
              "(use a folder outside it, or under runs/, which git ignores)")
    manifest = out / "manifest.csv"
    if manifest.exists():
        _fail(f"{manifest} exists; choose another --out (manifests are never overwritten)")
    out.mkdir(parents=True, exist_ok=True)
    rows = ph2_rows(shared, a.template) + kermany_rows(shared, a.template)
    if a.pneumoniamnist_max > 0:
        rows += pneumoniamnist_rows(shared, out, a.template, a.pneumoniamnist_max, a.seed)
    if a.with_ieee8023:
        rows += ieee8023_rows(shared, a.template)
    df = pd.DataFrame(rows)
    tmp = manifest.with_suffix(".csv.tmp")
    df.to_csv(tmp, index=False)
    os.replace(tmp, manifest)
    (out / "classes.json").write_text(json.dumps({"classes": CLASSES, "modalities": ["dermoscopy", "cxr"],
                                                 "with_ieee8023": a.with_ieee8023, "template": a.template}, indent=2))
    counts = df.groupby(["modal", "source", "split"]).size().to_dict()
    print(f"wrote {manifest}: {len(df)} rows; " + ", ".join(f"{'/'.join(k)} {v}" for k, v in counts.items()))
    return manifest


if __name__ == "__main__":
    main()
