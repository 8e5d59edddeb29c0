"""``python evaluate.py audit=<name>``: the bias, validity and hallucination audit of a generator.

It takes a generator (:mod:`medtrust.audit.generators`), independent classifier runs of the audited
finding and of a finding no prompt asks for, and real images with labels and demographics; it writes
``metrics/audit.json`` and every table as CSV into its own run folder (``runs/audit/<time>``). The
statistics are :mod:`medtrust.metrics.audit`'s.

What each figure is fitted on and reported on: the classifiers are fitted on their own training runs;
their decision rule is the calibrated probability >= 0.5 (argmax for two classes); their sensitivity and
false-positive rate for the corrections are measured on the audit's real images (``audit.real``),
which must be held out from the classifiers' training (the phantom configs use another data seed).
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from medtrust.audit.generators import FolderGenerator, PhantomGenerator, PipelineGenerator, RunGenerator
from medtrust.audit.prompts import build_prompt_set, check_prompt_table
from medtrust.evaluation.run_classifier import RunClassifier
from medtrust.metrics.audit import disparity, downstream_gain, kappa_agreement, paired_shift, rate, standardised_excess
from medtrust.metrics.calibration import compute_binary_ece
from medtrust.metrics.classification import predictive_uncertainty
from medtrust.runs.rundir import claim_run_dir
from medtrust.utils.io import atomic_write_bytes, write_csv, write_json
from medtrust.utils.logging import get_logger

log = get_logger(__name__)

AUDIT_KEYS = {"selector", "name", "folder", "generator", "prompts", "finding", "hallucinated", "classifiers", "real", "resize", "min_cell",
              "n_boot", "n_perm", "seed", "intersections", "consensus", "batch_size", "save_images", "downstream"}


def _plain(x: Any) -> Any:
    return OmegaConf.to_container(x, resolve=True) if isinstance(x, DictConfig) else x


def build_generator(g: Mapping[str, Any], finding: str, hallucinated: str, attributes: list[str] | None = None,
                    batch_size: int = 16) -> Any:
    kind = str(g.get("kind"))
    if kind == "phantom":
        return PhantomGenerator(int(g.get("size", 64)), int(g.get("seed", 0)), finding, hallucinated, g.get("inject"))
    if kind == "folder":
        if not g.get("folder"):
            raise ValueError("audit.generator.kind=folder needs audit.generator.folder=<generated images>")
        return FolderGenerator(g["folder"], g.get("csv"))
    if kind == "run":
        if not g.get("run"):
            raise ValueError("audit.generator.kind=run needs audit.generator.run=<generator run folder>")
        return RunGenerator(g["run"], str(g.get("checkpoint") or "best"), g.get("lora"), g.get("sampling"), batch_size,
                            attributes)
    if kind == "pipeline":
        if not g.get("folder"):
            raise ValueError("audit.generator.kind=pipeline needs audit.generator.folder=<save_pretrained folder>")
        return PipelineGenerator(g["folder"], g.get("sampling"), batch_size)
    raise ValueError(f"audit.generator.kind={kind!r}; expected phantom, run, pipeline or folder")


def load_classifiers(runs: Sequence[str] | None, finding: str, key: str, resize: bool, seed: int) -> list[tuple[str, RunClassifier, int]]:
    """``(name, classifier, index of the finding's class)`` of every run; refuses a run whose classes
    do not include the finding."""
    if not runs:
        raise ValueError(f"{key}: no classifier runs; expected a list of classifier run folders that detect {finding!r}")
    seen = [Path(str(r)).resolve() for r in runs]
    dup = sorted({str(r) for r in seen if seen.count(r) > 1})
    if dup:
        raise ValueError(f"{key}: {dup} listed twice; the audit needs independent classifiers (other runs)")
    out = []
    for i, r in enumerate(runs):
        clf = RunClassifier.from_run(r, key=f"{key}[{i}]", seed=seed, resize=resize)
        if not clf.classes:
            raise ValueError(f"{key}[{i}]={r}: its data config does not name its classes (data.class_names), so it "
                             f"cannot be checked to detect {finding!r}")
        if finding not in clf.classes:
            raise ValueError(f"{key}[{i}]={r}: its classes {clf.classes} do not include the audited finding {finding!r}")
        out.append((f"{Path(str(r)).name}#{i}", clf, clf.classes.index(finding)))
    return out


def real_images(real: Mapping[str, Any], findings: Sequence[str], attributes: Sequence[str]) -> tuple[torch.Tensor, pd.DataFrame]:
    """The real images (N×C×H×W in [0, 1]) and a table of their findings (0/1) and demographics.
    ``real.findings``: finding -> ``label`` (the record's label is 1), an attribute column holding 0/1, a
    constant 0 / 1 (known absent / present on every image: e.g. COVID-19 on CXRs taken before 2019), or
    null (not recorded on these images: figures that need it are left out)."""
    dm = instantiate(real["data"])
    if hasattr(dm, "setup"):
        dm.setup()
    imgs, _, recs = dm.load_split(str(real.get("split", "test")))
    cols = dict(real.get("findings") or {})
    rows = []
    for rec in recs:
        row = {"id": rec["id"]}
        attrs = rec.get("attrs") or {}
        for f in findings:
            if f not in cols:
                raise ValueError(f"audit.real.findings: no entry for finding {f!r}; expected label, an attribute name, "
                                 "0 / 1 (absent / present on every image) or null (not recorded)")
            src = cols[f]
            if src is None or isinstance(src, (bool, int)):
                if src is not None and int(src) not in (0, 1):
                    raise ValueError(f"audit.real.findings.{f}={src}; a constant must be 0 or 1")
                row[f] = np.nan if src is None else int(src)
                continue
            v = rec.get("label") if src == "label" else attrs.get(src)
            if v is None or str(v).strip() == "":
                row[f] = np.nan
            else:
                row[f] = int(int(float(v)) == 1) if src == "label" else int(str(v).strip() in ("1", "1.0", "True", "yes"))
        for a in attributes:
            row[a] = str(attrs.get(a, "")) or None
        rows.append(row)
    return torch.stack([t.float().div(255) for t in imgs]), pd.DataFrame(rows)


def predict(clfs: list[tuple[str, RunClassifier, int]], images: torch.Tensor, where: str) -> dict[str, dict[str, np.ndarray]]:
    """Per classifier: ``p`` (calibrated probability of the finding), ``flag`` (p >= 0.5), ``entropy`` of the
    mean prediction and ``mi`` (mutual information over the stochastic passes: epistemic)."""
    out = {}
    for name, clf, idx in clfs:
        clf.check_images(images, where)
        u = predictive_uncertainty(clf.sample_probabilities(images))  # from S x N x K sampled probabilities
        mean = u["mean"].numpy()
        out[name] = {"p": mean[:, idx], "flag": (mean[:, idx] >= 0.5).astype(float), "entropy": u["entropy"].numpy(),
                     "mi": u["mutual_information"].numpy()}
    return out


def _groups(df: pd.DataFrame, attrs: Sequence[str], intersections: bool) -> list[tuple[str, list[str]]]:
    out = [(a, [a]) for a in attrs]
    if intersections:
        out += [(f"{a}&{b}", [a, b]) for i, a in enumerate(attrs) for b in attrs[i + 1:]]
    return out


def _key(df: pd.DataFrame, cols: list[str]) -> pd.Series:
    return df[cols].astype(str).agg("&".join, axis=1)


def bias_block(df: pd.DataFrame, flags: np.ndarray, attrs: Sequence[str], a: Mapping[str, Any],
               correction: tuple[np.ndarray, np.ndarray] | None) -> dict[str, Any]:
    """Per attribute (and intersection): TPR, FPR, selection rate and accuracy by group, with disparities."""
    asked = df["asked"].astype(int).to_numpy()
    out = {}
    kw = dict(min_n=int(a["min_cell"]), n_boot=int(a["n_boot"]), n_perm=int(a["n_perm"]), seed=int(a["seed"]))
    for name, cols in _groups(df, attrs, bool(a.get("intersections", True))):
        key = _key(df, cols).to_numpy()
        values = sorted(set(key))
        m = {
            "tpr": disparity({v: flags[(key == v) & (asked == 1)] for v in values}, correction=correction, **kw),
            "fpr": disparity({v: flags[(key == v) & (asked == 0)] for v in values}, **kw),
            "selection_rate": disparity({v: flags[key == v] for v in values}, **kw),
            "accuracy": disparity({v: (flags == asked)[key == v].astype(float) for v in values}, **kw)}
        t = m["tpr"]
        out[name] = {"metric": "tpr", "gap": t["gap"], "gap_ci": t["gap_ci"], "p": t["p"], "ratio": t["ratio"],
                     "ratio_ci": t["ratio_ci"], "highest": t["highest"], "lowest": t["lowest"],
                     "corrected": t.get("corrected"), "metrics": m}
    return out


def shift_block(df: pd.DataFrame, flags: np.ndarray, attrs: Sequence[str], a: Mapping[str, Any]) -> dict[str, Any]:
    """Selection-rate shift of every group between the prompts with and without demographic terms."""
    w = df[df["variant"] == "demographic"].set_index("pair_id")
    wo = df[df["variant"] == "neutral"].set_index("pair_id")
    both = w.index.intersection(wo.index)
    fw = pd.Series(flags[(df["variant"] == "demographic").to_numpy()], index=w.index).loc[both].to_numpy()
    fwo = pd.Series(flags[(df["variant"] == "neutral").to_numpy()], index=wo.index).loc[both].to_numpy()
    w = w.loc[both]
    kw = dict(min_n=int(a["min_cell"]), n_boot=int(a["n_boot"]), seed=int(a["seed"]))
    out = {"all": paired_shift(fw, fwo, **kw)}
    for name, cols in _groups(w.reset_index(), attrs, bool(a.get("intersections", True))):
        key = _key(w, cols).to_numpy()
        for v in sorted(set(key)):
            label = "&".join(f"{c}={x}" for c, x in zip(cols, v.split("&")))
            out[label] = paired_shift(fw[key == v], fwo[key == v], **kw)
    return out


def hallucination_block(gen: dict[str, dict[str, np.ndarray]], real: dict[str, dict[str, np.ndarray]],
                        truth_real: np.ndarray, gen_df: pd.DataFrame, real_df: pd.DataFrame, attrs: Sequence[str],
                        a: Mapping[str, Any], finding_real: np.ndarray | None = None) -> dict[str, Any]:
    """The hallucinated finding's flag rate on generated images as an excess over real images without it,
    per classifier and for the consensus of the classifiers, overall and per subgroup; standardised over
    what the prompts asked for (the audited finding or not) against real images with / without it
    (:func:`medtrust.metrics.audit.standardised_excess`)."""
    kw = dict(min_n=int(a["min_cell"]), n_boot=int(a["n_boot"]), seed=int(a["seed"]))
    names = list(gen)
    rule = str(a.get("consensus", "majority"))
    if rule not in ("majority", "all", "any"):
        raise ValueError(f"audit.consensus={rule!r}; expected majority, all or any")

    def consensus(d: dict[str, dict[str, np.ndarray]]) -> np.ndarray:
        f = np.stack([d[n]["flag"] for n in names])
        return {"majority": (f.mean(0) > 0.5), "all": f.min(0) == 1, "any": f.max(0) == 1}[rule].astype(float)

    known = ~np.isnan(truth_real)
    neg, pos = known & (truth_real == 0), known & (truth_real == 1)
    asked = gen_df["asked"].astype(int).to_numpy()
    pair = gen_df["pair_id"].astype(str).to_numpy()  # the two images of a pair share their noise: resampled together
    fr = np.full(len(real_df), -1) if finding_real is None else np.nan_to_num(finding_real, nan=-1).astype(int)

    # the audited finding not recorded on any real image (audit.real.findings.<finding>: null): no stratified
    # baseline exists, so every stratum is compared with all real images without the hallucinated finding
    unrecorded = bool((fr == -1).all())

    def excess(g: np.ndarray, r: np.ndarray, gsel: np.ndarray, rsel: np.ndarray) -> dict[str, Any]:
        strata = ("asked", "not asked")
        if unrecorded:
            real_neg, real_pos = {"unstratified": r[rsel & neg]}, {"unstratified": r[rsel & pos]}
        else:
            real_neg = {s: r[rsel & neg & (fr == v)] for s, v in zip(strata, (1, 0))}
            real_pos = {s: r[rsel & pos & (fr == v)] for s, v in zip(strata, (1, 0))}
        return standardised_excess({s: g[gsel & (asked == v)] for s, v in zip(strata, (1, 0))}, real_neg, real_pos,
                                   clusters={s: pair[gsel & (asked == v)] for s, v in zip(strata, (1, 0))}, **kw)

    every_g, every_r = np.ones(len(gen_df), bool), np.ones(len(real_df), bool)
    per = {n: excess(gen[n]["flag"], real[n]["flag"], every_g, every_r) for n in names}
    cg, cr = consensus(gen), consensus(real)
    top = excess(cg, cr, every_g, every_r)
    by_group: dict[str, Any] = {}
    for attr in attrs:
        by_group[attr] = {}
        gkey = gen_df[attr].astype(str).to_numpy()
        rkey = real_df[attr].astype(str).to_numpy() if attr in real_df else None
        for v in sorted(set(gkey)):
            rsel = (rkey == v) if rkey is not None else np.zeros(len(real_df), bool)
            if (rsel & neg).sum() >= int(a["min_cell"]):
                by_group[attr][v] = {**excess(cg, cr, gkey == v, rsel), "baseline": "group"}
            else:  # this group is absent or too rare among the real images: all real images are the baseline
                by_group[attr][v] = {**excess(cg, cr, gkey == v, every_r), "baseline": "overall"}
    return {**top, "consensus": rule,
            "standardised_on": ("not standardised: the audited finding is not recorded on the real images" if unrecorded
                                else "the audited finding asked / not asked (real: present / absent)"),
            "per_classifier": per, "agreement": kappa_agreement({n: gen[n]["flag"] for n in names}), "by_group": by_group}


def validity_block(gen: dict[str, dict[str, np.ndarray]], gen_df: pd.DataFrame, real: dict[str, dict[str, np.ndarray]],
                   real_df: pd.DataFrame, finding: str, attrs: Sequence[str], a: Mapping[str, Any],
                   syn_truth: np.ndarray | None = None) -> dict[str, Any]:
    """Accuracy, ECE, entropy and MC-dropout mutual information of each finding classifier on real against
    synthetic images, per class (finding asked / present or not) and per subgroup. ``syn_truth``: what the
    generated images are meant to show (default: the prompt's ``asked``; the unasked finding: 0 for all)."""
    min_n = int(a["min_cell"])

    def cell(p: np.ndarray, y: np.ndarray, ent: np.ndarray, mi: np.ndarray) -> dict[str, Any]:
        if len(y) < min_n:
            return {"status": "insufficient", "n": int(len(y))}
        acc = rate(((p >= 0.5) == (y == 1)).astype(float))
        return {"status": "ok", "n": int(len(y)), "accuracy": acc["rate"], "accuracy_ci": acc["ci"],
                "ece": compute_binary_ece(torch.tensor(p), torch.tensor(y).long()), "entropy": float(np.mean(ent)),
                "mutual_information": float(np.mean(mi))}

    out: dict[str, Any] = {}
    syn_y = gen_df["asked"].astype(int).to_numpy() if syn_truth is None else np.asarray(syn_truth).astype(int)
    real_y = real_df[finding].to_numpy(dtype=float)
    known = ~np.isnan(real_y)
    for name in gen:
        g, r = gen[name], real[name]
        blocks: dict[str, Any] = {}
        for cls_name, cv in (("all", None), (finding, 1), (f"no_{finding}", 0)):
            sg = np.ones(len(syn_y), bool) if cv is None else syn_y == cv
            sr = known if cv is None else known & (real_y == cv)
            entry = {"overall": {"real": cell(r["p"][sr], real_y[sr], r["entropy"][sr], r["mi"][sr]),
                                 "synthetic": cell(g["p"][sg], syn_y[sg], g["entropy"][sg], g["mi"][sg])}}
            for attr in attrs:
                for v in sorted(set(gen_df[attr].astype(str))):
                    gsel = sg & (gen_df[attr].astype(str).to_numpy() == v)
                    rsel = sr & (real_df[attr].astype(str).to_numpy() == v) if attr in real_df else np.zeros(len(real_y), bool)
                    entry[f"{attr}={v}"] = {"real": cell(r["p"][rsel], real_y[rsel], r["entropy"][rsel], r["mi"][rsel]),
                                            "synthetic": cell(g["p"][gsel], syn_y[gsel], g["entropy"][gsel], g["mi"][gsel])}
            blocks[cls_name] = entry
        out[name] = blocks
    return out


def validity_rows(m: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per classifier, class, subgroup and image source (real / synthetic) of ``validity_by_classifier``."""
    rows = []
    for clf, blocks in m["validity_by_classifier"].items():
        for cls_name, entry in blocks.items():
            for group, cells in entry.items():
                for source, c in cells.items():
                    rows.append({"classifier": clf, "finding": m["classifiers"][clf]["finding"], "class": cls_name,
                                 "group": group, "images": source, **{k: (str(v) if isinstance(v, list) else v)
                                                                      for k, v in c.items()}})
    return rows


def _flat(prefix: str, block: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows of a CSV from a nested block of group cells."""
    rows = []
    for k, v in block.items():
        if isinstance(v, Mapping) and ("status" in v or "rate" in v):
            rows.append({"table": prefix, "group": k, **{x: (y if not isinstance(y, (list, dict)) else str(y))
                                                          for x, y in v.items()}})
    return rows


def run_audit(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """The audit of ``cfg.audit`` into ``out_dir``."""
    a = _plain(cfg.audit)
    unknown = sorted(set(a) - AUDIT_KEYS)
    if unknown:
        raise ValueError(f"audit: unknown key(s) {unknown}; expected {sorted(AUDIT_KEYS)}")
    claim_run_dir(out_dir, {"kind": "audit", "audit": a.get("name")})
    finding, hallucinated = str(a["finding"]), str(a["hallucinated"])
    attrs = list(dict(a["prompts"]["attributes"]))
    gen = build_generator(dict(a["generator"]), finding, hallucinated, attrs, int(a.get("batch_size", 16)))
    gen.check_attributes(attrs)
    if isinstance(gen, FolderGenerator):
        prompts = gen.table()
        check_prompt_table(prompts, attrs, str(gen.csv))
    else:
        prompts = build_prompt_set({**dict(a["prompts"]), "seed": a["prompts"].get("seed", a.get("seed", 0))})
    resize, seed = bool(a.get("resize", False)), int(a.get("seed", 0))
    clf_cfg = dict(a["classifiers"])
    f_clfs = load_classifiers(clf_cfg.get(finding), finding, f"audit.classifiers.{finding}", resize, seed)
    h_clfs = load_classifiers(clf_cfg.get(hallucinated), hallucinated, f"audit.classifiers.{hallucinated}", resize, seed)
    sel_cfg, selector = dict(a.get("selector") or {}), None
    if sel_cfg.get("run"):  # checked before generating (which can take minutes)
        from medtrust.generation.selector import Selector

        if sel_cfg.get("min_score") is None:
            raise ValueError("audit.selector.run needs audit.selector.min_score (the score an image must reach to be kept)")
        selector = Selector.from_run(str(sel_cfg["run"]), seed=int(sel_cfg.get("seed", 0)))
    downstream = read_downstream(dict(a.get("downstream") or {}))  # checked before generating
    training = training_data(gen)  # before generating too: minutes of sampling are never lost to it
    t0 = time.perf_counter()
    images, table = gen.generate(prompts)
    t_gen = time.perf_counter() - t0
    if selector is not None:  # a quality selector run scores every generated image; kept = score >= min_score
        score, _ = selector.score(images, str(sel_cfg.get("score", "expected")))
        table["selector_score"], table["kept"] = score, (score >= float(sel_cfg["min_score"])).astype(int)
    log.info(f"audit: {len(table)} generated images ({gen.kind}), {table['pair_id'].nunique()} counterfactual pairs")
    r_images, r_df = real_images(dict(a["real"]), [finding, hallucinated], attrs)
    gen_f = predict(f_clfs, images, "audit generated images")
    gen_h = predict(h_clfs, images, "audit generated images")
    real_f = predict(f_clfs, r_images, "audit.real images")
    real_h = predict(h_clfs, r_images, "audit.real images")
    t_cls = time.perf_counter() - t0 - t_gen
    metrics = {"kind": "audit", "name": a.get("name"), "generator": gen.describe(),
               "classifiers": {n: {**c.describe(), "finding": finding} for n, c, _ in f_clfs}
               | {n: {**c.describe(), "finding": hallucinated} for n, c, _ in h_clfs},
               **audit_metrics(table, gen_f, gen_h, r_df, real_f, real_h, finding, hallucinated, attrs, a),
               "training_data": training}
    kept_src = prompts if isinstance(gen, FolderGenerator) and "kept" in prompts else table if "kept" in table else None
    if kept_src is not None:
        metrics["selector"] = selector_block(kept_src, attrs, a, "the kept images only (the folder holds no others)"
                                             if isinstance(gen, FolderGenerator) else "every generated image (kept or not)")
    if downstream is not None:
        metrics["downstream"] = {**downstream_gain(*downstream["probs"], n_boot=int(a["n_boot"]), seed=int(a["seed"])),
                                 **{k: v for k, v in downstream.items() if k != "probs"}}
    if a.get("save_images"):
        save_generated(out_dir / "generated", images, table)
    metrics["seconds"] = {"generation" if gen.kind != "folder" else "loading": t_gen,
                          "classifiers": t_cls, "statistics": time.perf_counter() - t0 - t_gen - t_cls,
                          "total": time.perf_counter() - t0}
    write_json(out_dir / "metrics" / "audit.json", metrics)
    gen_rows = table.drop(columns=[c for c in table.columns if c == "image"]).copy()
    for name in gen_f:
        gen_rows[f"p_{finding}:{name}"], gen_rows[f"flag_{finding}:{name}"] = gen_f[name]["p"], gen_f[name]["flag"]
    for name in gen_h:
        gen_rows[f"p_{hallucinated}:{name}"], gen_rows[f"flag_{hallucinated}:{name}"] = gen_h[name]["p"], gen_h[name]["flag"]
    write_csv(out_dir / "tables" / "generated.csv", gen_rows)
    write_csv(out_dir / "tables" / "real.csv", r_df)
    rows = []
    for attr, blk in metrics["bias"].items():
        for metric, d in blk["metrics"].items():
            rows += [{**r, "attribute": attr, "metric": metric} for r in _flat(metric, d["groups"])]
    write_csv(out_dir / "tables" / "bias_groups.csv", pd.DataFrame(rows))
    write_csv(out_dir / "tables" / "selection_rate_shift.csv", pd.DataFrame(_flat("shift", metrics["selection_rate_shift"])))
    write_csv(out_dir / "tables" / "hallucination_groups.csv", pd.DataFrame(
        [r for attr, g in metrics["hallucination"]["by_group"].items() for r in _flat(attr, g)]))
    write_csv(out_dir / "tables" / "validity.csv", pd.DataFrame(validity_rows(metrics)))
    atomic_write_bytes(out_dir / "config.yaml", OmegaConf.to_yaml(cfg.audit, resolve=True).encode())
    from medtrust.report.html import build_run_report

    build_run_report(out_dir, title=f"medtrust audit ({a.get('name')})")
    log.info(f"audit written to {out_dir}  report: {out_dir / 'report' / 'index.html'}")
    return metrics


def training_data(gen: Any) -> dict[str, Any]:
    """The subgroup make-up of the generator's training set; when its data cannot be read here (a run from
    another machine, a moved manifest) ``{"status": "unavailable", "reason": ...}`` with a warning: the audit's
    other figures do not depend on it."""
    from medtrust.data.records import DataError

    try:
        return gen.training_composition()
    except (DataError, FileNotFoundError, OSError) as err:
        log.warning(f"audit: the generator's training data is unavailable ({err}); training_data is reported as unavailable")
        return {"status": "unavailable", "reason": str(err)}


def save_generated(folder: Path, images: torch.Tensor, table: pd.DataFrame) -> None:
    """The audited images as a ``generate.py``-style folder (PNGs + ``generated.csv``), so that a
    classifier can train on them (``data.train_extra``: the downstream test) or another audit can read
    them (``audit.generator.kind=folder``). ``label`` is 1 when the prompt asked for the audited
    finding; an image a selector rejected is listed without a file."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=False)
    rows = []
    for i, row in enumerate(table.drop(columns=[c for c in ("image", "file", "row", "sample") if c in table]).to_dict("records")):
        kept = str(row.get("kept", 1)) in ("1", "1.0", "True")
        name = f"audit_{i:05d}.png" if kept else ""
        if kept:
            x = images[i].detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
            arr = x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()
            Image.fromarray(arr).save(folder / name)
        rows.append({"file": name, "row": i, "sample": 0, **row, "label": int(row["asked"])})
    write_csv(folder / "generated.csv", pd.DataFrame(rows))


def read_downstream(d: Mapping[str, Any]) -> dict[str, Any] | None:
    """The downstream pairs (``audit.downstream``): classifier runs trained without (``baseline``) and with
    (``augmented``, ``data.train_extra`` set) synthetic images, paired by position, read from their
    ``<split>_predictions.csv`` on the same real images. None when no runs are given."""
    from medtrust.runs.rundir import load_run_config

    base, aug = list(d.get("baseline") or []), list(d.get("augmented") or [])
    if not base and not aug:
        return None
    if len(base) != len(aug):
        raise ValueError(f"audit.downstream: {len(base)} baseline and {len(aug)} augmented runs; expected pairs "
                         "(the k-th of each trained alike with the same seed)")
    split = str(d.get("split", "test"))
    frames, ref = [], None
    for key, runs, want_extra in (("baseline", base, False), ("augmented", aug, True)):
        for run in runs:
            extra = OmegaConf.select(load_run_config(run), "data.train_extra", default=None)
            if (extra is not None) != want_extra:
                raise ValueError(f"audit.downstream.{key}: {run} was trained {'with' if extra is not None else 'without'} "
                                 f"data.train_extra; expected {'synthetic' if want_extra else 'no synthetic'} training images")
            path = Path(run) / f"{split}_predictions.csv"
            if not path.is_file():
                raise ValueError(f"audit.downstream.{key}: {path} not found (train.py writes it after testing the run)")
            df = pd.read_csv(path, dtype={"id": str})
            missing = {"id", "label", "prob_1"} - set(df.columns)
            if missing:
                raise ValueError(f"{path}: no column(s) {sorted(missing)}; expected a binary classifier's predictions")
            df = df.sort_values("id").reset_index(drop=True)
            if ref is None:
                ref = df
            elif list(df["id"]) != list(ref["id"]) or list(df["label"]) != list(ref["label"]):
                raise ValueError(f"{path}: not the same {split} images and labels as {frames[0][1]}; the pairs must be "
                                 "scored on the same real images")
            frames.append((key, str(path), df["prob_1"].to_numpy(float)))
    return {"probs": ([p for k, _, p in frames if k == "baseline"], [p for k, _, p in frames if k == "augmented"],
                      ref["label"].to_numpy(int)),
            "split": split, "baseline_runs": [str(r) for r in base], "augmented_runs": [str(r) for r in aug],
            "fitted": "each run on its own training split (augmented: plus the synthetic images); reported on the runs' "
                      f"shared real {split} split, which none of them trained on"
                      + (" (in-sample for the checkpoint choice: each run chose its checkpoint on val)" if split == "val"
                         else " or chose its checkpoint on")}


def audit_metrics(table: pd.DataFrame, gen_f: dict[str, dict[str, np.ndarray]], gen_h: dict[str, dict[str, np.ndarray]],
                  r_df: pd.DataFrame, real_f: dict[str, dict[str, np.ndarray]], real_h: dict[str, dict[str, np.ndarray]],
                  finding: str, hallucinated: str, attrs: Sequence[str], a: Mapping[str, Any]) -> dict[str, Any]:
    """Every figure of the audit from the classifiers' calls: ``gen_*`` / ``real_*`` map a classifier's
    name to its ``p``, ``flag``, ``entropy``, ``mi`` on the generated images (rows of ``table``) and on the
    real images (rows of ``r_df``); the first finding classifier is the headline of ``bias``."""
    ry = r_df[finding].to_numpy()
    names = list(gen_f)
    bias: dict[str, Any] = {}
    for variant in ("demographic", "neutral"):
        sel = (table["variant"] == variant).to_numpy()
        bias[variant] = {}
        for name in names:
            corr = (real_f[name]["flag"][ry == 1], real_f[name]["flag"][ry == 0])
            bias[variant][name] = bias_block(table[sel].reset_index(drop=True), gen_f[name]["flag"][sel], attrs, a, corr)
    first = names[0]
    shift = {name: shift_block(table, gen_f[name]["flag"], attrs, a) for name in names}
    validity = validity_block(gen_f, table, real_f, r_df, finding, attrs, a)
    # the unasked finding's classifiers too: on real images per class and subgroup (where the real images record
    # it), on generated images against what no prompt asked for (their accuracy there is 1 - their flag rate)
    validity_h = validity_block(gen_h, table, real_h, r_df, hallucinated, attrs, a, syn_truth=np.zeros(len(table)))
    composition = {attr: {str(k): int(v) for k, v in r_df[attr].fillna("not recorded").value_counts().items()}
                   for attr in attrs if attr in r_df}
    out = {
        "finding": finding, "hallucinated": hallucinated, "n_generated": int(len(table)),
        "n_pairs": int(table["pair_id"].nunique()), "n_real": int(len(r_df)), "min_cell": int(a["min_cell"]),
        "fitted": {"classifiers": "their own training runs; decision rule p >= 0.5 of the calibrated probability",
                   "corrections": "sensitivity and false-positive rate of each classifier on the audit's real images"},
        "bias": bias["demographic"][first], "bias_neutral": bias["neutral"][first], "bias_by_classifier": bias,
        "selection_rate_shift": shift[first], "selection_rate_shift_by_classifier": shift,
        "hallucination": hallucination_block(gen_h, real_h, r_df[hallucinated].to_numpy(), table, r_df, attrs, a,
                                             r_df[finding].to_numpy(dtype=float)),
        "validity": validity[first], "validity_by_classifier": validity | validity_h,
        "validity_hallucinated": validity_h[list(gen_h)[0]],
        "real_data": {"composition": composition}}
    if "truth_finding" in table:  # known truth (phantom generator): what the audit should recover
        out["truth"] = truth_block(table, attrs, a)
    return out


def selector_block(df: pd.DataFrame, attrs: Sequence[str], a: Mapping[str, Any], figures_on: str) -> dict[str, Any]:
    """What the quality selector's keep / reject does to the subgroup make-up (``kept`` column, 0/1):
    per attribute each group's keep rate and its share among all and among kept images, with CIs
    (resampling counterfactual pairs) and a chi-square test (:func:`medtrust.metrics.selection.kept_composition`)."""
    from medtrust.metrics.selection import kept_composition

    k = df.assign(kept=df["kept"].astype(str).isin(["1", "1.0", "True"]))
    return {**kept_composition(k, list(attrs), kept="kept", cluster="pair_id", n_boot=int(a["n_boot"]),
                               seed=int(a["seed"]), min_group_size=int(a["min_cell"])), "figures_on": figures_on}


def truth_block(table: pd.DataFrame, attrs: Sequence[str], a: Mapping[str, Any]) -> dict[str, Any]:
    """The generator's own figures (phantom): the share of requested findings drawn per group and the
    share of images with the unasked finding, what the corrected estimates should recover."""
    out: dict[str, Any] = {"hallucination_rate": float(table["truth_hallucination"].mean())}
    demo = table[(table["variant"] == "demographic") & (table["asked"].astype(int) == 1)]
    for attr in attrs:
        g = demo.groupby(demo[attr].astype(str))["truth_finding"].mean()
        out[f"drawn.{attr}"] = {str(k): float(v) for k, v in g.items()}
        out[f"drawn_gap.{attr}"] = float(g.max() - g.min()) if len(g) > 1 else None
    return out
