"""``python evaluate.py audit=phantom``: the audit end to end with tiny classifier runs (its figures are
checked on known truth in tests/unit/audit; here: the command, its files, and what bad input gets)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.conftest import refused, run_script

TINY_CLS = ["data.source.n_images=100", "data.source.size=32", "data.image_size=[32,32]", "trainer.max_epochs=1",
            "model.net.backbone=resnet10t", "model.mc_samples=3", "logger=csv", "data.splits.calibration_fraction=0.2"]
TINY_AUDIT = ["audit.generator.size=32", "audit.prompts.per_cell=4", "audit.real.data.source.n_images=160",
              "audit.real.data.source.size=32", "audit.real.data.image_size=[32,32]", "audit.min_cell=8",
              "audit.n_boot=200", "audit.n_perm=200"]


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit_clf")
    runs = {}
    for name, exp, extra in (("pn", "audit_pneumonia", []), ("cv", "audit_covid", []), ("cv2", "audit_covid", ["seed=3"])):
        runs[name] = root / name
        run_script("train.py", f"experiment={exp}", *TINY_CLS, *extra, f"hydra.run.dir={runs[name]}", timeout=900)
    return runs


def _audit(classifiers, out: Path, *extra: str, check: bool = True, pn: str | None = None, cv: str | None = None):
    pn = pn or f"[{classifiers['pn']}]"
    cv = cv or f"[{classifiers['cv']},{classifiers['cv2']}]"
    args = ["audit=phantom", f"audit.classifiers.pneumonia={pn}", f"audit.classifiers.covid={cv}", *TINY_AUDIT, *extra,
            f"hydra.run.dir={out}"]
    return run_script("evaluate.py", *args, timeout=900) if check else refused("evaluate.py", *args)


def test_the_audit_writes_its_figures_and_tables(classifiers, tmp_path):
    out = tmp_path / "audit"
    _audit(classifiers, out, "audit.generator.inject.hallucination=0.4", "audit.generator.inject.tpr={race: {Hispanic: 0.5}}")
    m = json.loads((out / "metrics" / "audit.json").read_text())
    assert m["n_generated"] == 2 * 4 * 3 * 4 * 2 and m["n_pairs"] == m["n_generated"] // 2
    assert {"rate", "real_rate", "excess", "excess_ci"} <= set(m["hallucination"])
    assert set(m["hallucination"]["per_classifier"]) == {"cv#0", "cv2#1"}
    for attr in ("sex", "race", "age_group", "sex&race"):
        assert {"gap", "gap_ci", "p"} <= set(m["bias"][attr]) and set(m["bias"][attr]["metrics"]) == {
            "tpr", "fpr", "selection_rate", "accuracy"}
    assert "race=Hispanic" in m["selection_rate_shift"] and "sex=F&race=Hispanic" in m["selection_rate_shift"]
    assert {"real", "synthetic"} <= set(m["validity"]["pneumonia"]["sex=F"])
    # 4 prompts per sex x race x age cell: an intersection of sex and race has 12 per variant, 6 asking
    cells = m["bias"]["sex&race"]["metrics"]["tpr"]["groups"]
    assert all(c == {"status": "insufficient", "n": 6} for c in cells.values())
    assert m["truth"]["drawn.race"]["White"] == 1.0 and m["truth"]["drawn.race"]["Hispanic"] < 1.0
    assert set(m["validity_by_classifier"]) == {"pn#0", "cv#0", "cv2#1"}
    vh = m["validity_hallucinated"]["all"]["overall"]["synthetic"]  # nothing asked for covid: accuracy = 1 - flag rate
    assert vh["accuracy"] == pytest.approx(1 - m["hallucination"]["per_classifier"]["cv#0"]["rate"])
    valid = pd.read_csv(out / "tables" / "validity.csv")
    assert {"classifier", "class", "group", "images", "accuracy", "ece"} <= set(valid.columns)
    assert set(valid["classifier"]) == {"pn#0", "cv#0", "cv2#1"} and "sex=F" in set(valid["group"])
    for t in ("generated", "real", "bias_groups", "selection_rate_shift", "hallucination_groups", "validity"):
        assert (out / "tables" / f"{t}.csv").is_file(), t
    gen = pd.read_csv(out / "tables" / "generated.csv")
    assert len(gen) == m["n_generated"] and {"truth_finding", "truth_hallucination", "flag_covid:cv#0"} <= set(gen.columns)
    assert json.loads((out / "run.json").read_text())["kind"] == "audit"
    html = (out / "report" / "index.html").read_text()
    assert "Audit of a generator" in html and "Selection-rate shift" in html and html.count("data:image/png") == 3
    assert "Validity: the classifiers on real against synthetic images" in html
    assert {p.name for p in (out / "figures" / "audit").glob("*.png")} == {
        "tpr_by_group.png", "selection_rate_shift.png", "hallucination_by_group.png"}
    # the same command and seeds give the same figures; a finished audit folder is never written over
    again = tmp_path / "again"
    _audit(classifiers, again, "audit.generator.inject.hallucination=0.4", "audit.generator.inject.tpr={race: {Hispanic: 0.5}}")
    m2 = json.loads((again / "metrics" / "audit.json").read_text())
    assert m2["bias"] == m["bias"] and m2["hallucination"] == m["hallucination"]
    proc = _audit(classifiers, out, check=False)
    assert proc.returncode != 0 and "already holds a run" in proc.stdout + proc.stderr


def _folder(tmp_path: Path, drop: str | None = None) -> Path:
    folder = tmp_path / "gen"
    (folder / "images").mkdir(parents=True)
    rows = []
    for k in range(4):
        Image.fromarray((np.random.default_rng(k).random((32, 32)) * 255).astype("uint8")).save(folder / "images" / f"{k}.png")
        rows.append({"file": f"images/{k}.png", "prompt": "Chest X-ray.", "variant": ["demographic", "neutral"][k % 2],
                     "pair_id": k // 2, "asked": 1, "sex": "F", "race": "White", "age_group": "<40"})
    df = pd.DataFrame(rows)
    (df.drop(columns=[drop]) if drop else df).to_csv(folder / "generated.csv", index=False)
    return folder


@pytest.mark.parametrize("case, args, message", [
    ("not the finding", {"cv": "pn"}, "do not include the audited finding 'covid'"),
    ("twice", {"cv": "cv,cv"}, "listed twice; the audit needs independent classifiers"),
    ("preprocessing", ["audit.generator.size=48"], "its preprocessing does not match"),
    ("no csv", ["audit.generator.kind=folder", "audit.generator.folder={folder}", "audit.generator.csv={folder}/nope.csv"],
     "needs the CSV of their prompts and intended attributes"),
    ("attribute", ["audit.generator.kind=folder", "audit.generator.folder={folder_norace}"],
     "missing column(s) ['race']; every prompt must carry its declared attributes"),
    ("unknown key", ["+audit.colour=blue"], "audit: unknown key(s) ['colour']"),
])
def test_bad_input_is_refused_with_a_message(classifiers, tmp_path, case, args, message):
    folder, norace = _folder(tmp_path / "a"), _folder(tmp_path / "b", drop="race")
    kw = {}
    if isinstance(args, dict):
        kw = {k: "[" + ",".join(str(classifiers[x]) for x in v.split(",")) + "]" for k, v in args.items()}
        args = []
    args = [a.format(folder=folder, folder_norace=norace) for a in args]
    proc = _audit(classifiers, tmp_path / "out", *args, check=False, **kw)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and message in out, out[-2000:]
    assert not (tmp_path / "out" / "metrics" / "audit.json").exists()


def test_a_folder_of_generated_images_is_audited_from_its_csv(classifiers, tmp_path):
    folder = _folder(tmp_path)
    out = tmp_path / "audit"
    _audit(classifiers, out, "audit.generator.kind=folder", f"audit.generator.folder={folder}")
    m = json.loads((out / "metrics" / "audit.json").read_text())
    assert m["n_generated"] == 4 and m["generator"]["kind"] == "folder" and "truth" not in m
    assert m["training_data"]["status"] == "unknown"
    assert m["hallucination"]["status"] == "insufficient" and m["hallucination"]["n"] == 4


def test_a_selector_run_scores_the_generated_images_and_its_keep_rule_is_audited(classifiers, tmp_path):
    """audit.selector.run: a quality selector run (a tiny one, trained here on rated noise images) scores every
    generated image; kept = score >= min_score, and the audit reports what keeping does to each group."""
    rated = tmp_path / "rated"
    rated.mkdir()
    rows = []
    for k in range(48):
        level = k % 3
        arr = (np.random.default_rng(k).random((32, 32, 3)) * (0.3 + 0.35 * level) * 255).astype("uint8")
        Image.fromarray(arr).save(rated / f"{k}.png")
        rows.append({"path": f"{k}.png", "rating": level + 1})
    pd.DataFrame(rows).to_csv(rated / "ratings.csv", index=False)
    sel = tmp_path / "selector"
    run_script("train.py", "experiment=minim_selector", f"data.manifest={rated / 'ratings.csv'}", "data.image_size=[32,32]",
               "trainer.max_epochs=1", "model.net.backbone=resnet10t", "model.mc_samples=2", "data.batch_size=8",
               "data.drop_last=true", "evaluation.figures=false", "logger=csv", f"hydra.run.dir={sel}", timeout=600)
    out = tmp_path / "audit"
    _audit(classifiers, out, f"audit.selector.run={sel}", "audit.selector.min_score=2.0")
    m = json.loads((out / "metrics" / "audit.json").read_text())
    s = m["selector"]
    assert s["figures_on"] == "every generated image (kept or not)" and s["n"] == m["n_generated"]
    assert {"sex", "race", "age_group"} <= set(s["attributes"]) and "keep_rate_gap" in s["attributes"]["sex"]
    gen = pd.read_csv(out / "tables" / "generated.csv")
    assert {"selector_score", "kept"} <= set(gen.columns) and s["n_kept"] == int(gen.kept.sum())
    assert ((gen.selector_score >= 2.0) == (gen.kept == 1)).all()
    proc = _audit(classifiers, tmp_path / "no_min", f"audit.selector.run={sel}", check=False)
    assert proc.returncode != 0 and "audit.selector.run needs audit.selector.min_score" in proc.stdout + proc.stderr


def test_saved_audit_images_train_an_augmented_classifier_whose_gain_the_audit_reports(classifiers, tmp_path):
    """Downstream use: audit.save_images writes the audited images as a generate.py folder; a classifier trained
    like ``pn`` (same seed) with them added (data.train_extra) is paired with ``pn`` on the same real test split."""
    first = tmp_path / "first"
    _audit(classifiers, first, "audit.save_images=true")
    gen = pd.read_csv(first / "generated" / "generated.csv")
    assert len(gen) == json.loads((first / "metrics" / "audit.json").read_text())["n_generated"]
    assert (gen["label"] == gen["asked"]).all() and all((first / "generated" / f).is_file() for f in gen["file"])
    aug = tmp_path / "aug"
    run_script("train.py", "experiment=audit_pneumonia_augmented", *TINY_CLS, f"data.train_extra.folder={first / 'generated'}",
               f"hydra.run.dir={aug}", timeout=900)
    splits = pd.read_csv(aug / "splits" / "splits.csv")
    base_splits = pd.read_csv(classifiers["pn"] / "splits" / "splits.csv")
    assert (splits["id"].str.startswith("extra/") & (splits["split"] == "train")).sum() == len(gen)
    for split in ("val", "test", "cal"):
        assert sorted(splits[splits.split == split]["id"]) == sorted(base_splits[base_splits.split == split]["id"])
    out = tmp_path / "audit"
    _audit(classifiers, out, f"audit.downstream.baseline=[{classifiers['pn']}]", f"audit.downstream.augmented=[{aug}]")
    d = json.loads((out / "metrics" / "audit.json").read_text())["downstream"]
    test = pd.read_csv(aug / "test_predictions.csv")
    assert d["n_pairs"] == 1 and d["n_images"] == len(test) and d["split"] == "test"
    assert d["pairs"][0]["auroc_augmented"] == pytest.approx(json.loads((aug / "metrics" / "test.json").read_text())["cls"]["auroc"], abs=1e-6)
    lo, hi = d["auroc"]["diff_ci"]
    assert lo <= d["auroc"]["diff"] <= hi
    assert "Downstream use" in (out / "report" / "index.html").read_text()
    # the roles are checked from each run's config: a run trained with synthetic images is no baseline
    proc = _audit(classifiers, tmp_path / "swapped", f"audit.downstream.baseline=[{aug}]",
                  f"audit.downstream.augmented=[{classifiers['pn']}]", check=False)
    assert proc.returncode != 0 and "was trained with data.train_extra; expected no synthetic" in proc.stdout + proc.stderr
    proc = _audit(classifiers, tmp_path / "unpaired", f"audit.downstream.augmented=[{aug}]", check=False)
    assert proc.returncode != 0 and "0 baseline and 1 augmented runs; expected pairs" in proc.stdout + proc.stderr


def test_real_findings_known_absent_or_not_recorded(classifiers, tmp_path):
    """audit.real.findings: a constant 0 (COVID-19 on CXRs taken before 2019: every real image is a negative) and
    null (pneumonia not recorded): the hallucination baseline is every real image, unstratified and said so; the
    corrections and real-side validity that need the unrecorded finding are left out, never guessed."""
    out = tmp_path / "audit"
    _audit(classifiers, out, "audit.real.findings.pneumonia=null", "audit.real.findings.covid=0")
    m = json.loads((out / "metrics" / "audit.json").read_text())
    real = pd.read_csv(out / "tables" / "real.csv")
    assert (real["covid"] == 0).all() and real["pneumonia"].isna().all()
    h = m["hallucination"]
    assert h["status"] == "ok" and h["n_real"] == len(real) and h["standardised_on"].startswith("not standardised")
    assert {s["baseline"] for s in h["strata"].values()} == {"all strata"} and h["corrected"] is None
    assert m["bias"]["sex"]["corrected"]["gap"] is None
    assert m["validity"]["all"]["overall"]["real"] == {"status": "insufficient", "n": 0}
    proc = _audit(classifiers, tmp_path / "bad", "audit.real.findings.covid=2", check=False)
    assert proc.returncode != 0 and "audit.real.findings.covid=2; a constant must be 0 or 1" in proc.stdout + proc.stderr
