"""Classifier under distribution shift: the corruption benchmark (``evaluate.py shift=corruptions``),
prevalence shift with the EM label-shift correction, and test-time adaptation of batch-norm statistics.

For every condition (clean, and each corruption at each severity) and every variant (as trained;
``adapt_bn``: batch-norm statistics re-estimated on the condition's unlabelled images, Schneider et al.
2020; ``em``: priors re-estimated by EM, Saerens et al. 2002; both), every uncertainty method is
scored with and without its temperature: AUROC, accuracy, top-label ECE, Brier, NLL, the mean
aleatoric (expected entropy) and epistemic (mutual information) uncertainty, and the coverage and
size of the conformal sets fitted on the calibration split. Ovadia et al. (2019) show these as box
plots over the corruptions at each severity; so does ``figures/shift/corruptions.png``.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from medtrust.evaluation.ood import eval_loader
from medtrust.utils.logging import get_logger

log = get_logger(__name__)
METRICS = ("auroc", "accuracy", "ece_top_label", "brier", "nll")


@torch.no_grad()
def adapt_bn(task: torch.nn.Module, loader: Any) -> tuple[torch.nn.Module, int]:
    """A copy of ``task`` whose batch-norm running statistics are re-estimated on ``loader``'s images
    (cumulative average over the whole set; labels unused; every other layer in eval mode).

    Returns:
        the adapted copy and how many batch-norm layers were adapted (0: returned unchanged).
    """
    adapted = copy.deepcopy(task).eval()
    bns = [m for m in adapted.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return adapted, 0
    dev = next(adapted.parameters()).device
    for m in bns:
        m.reset_running_stats()
        m.momentum = None          # cumulative moving average: every image counts alike
        m.train()
    for batch in loader:
        adapted.member_logits(batch["image"].to(dev))
    for m in bns:
        m.eval()
    return adapted, len(bns)


def source_prior(cal: pd.DataFrame, n_classes: int) -> np.ndarray:
    """Class frequencies of the calibration split (the priors the calibrated probabilities carry)."""
    counts = np.bincount(cal["label"].to_numpy().astype(int), minlength=n_classes).astype(float)
    return counts / counts.sum()


def _score(samples: torch.Tensor, t: float, labels: torch.Tensor, prior: np.ndarray | None, c: Any,
           cal: pd.DataFrame | None, method: str, scaled: bool) -> dict[str, Any]:
    from medtrust.metrics import conformal as cp
    from medtrust.metrics.classification import compute_classification_metrics, predictive_uncertainty
    from medtrust.metrics.label_shift import em_priors

    unc = predictive_uncertainty(torch.softmax(samples.double() / t, -1))
    probs = unc["mean"]
    out: dict[str, Any] = {}
    if prior is not None:
        em = em_priors(probs.numpy(), prior)
        probs = torch.from_numpy(em["probs"])
        out["estimated_prior_1"] = float(em["prior"][1]) if len(prior) == 2 else None
    m = compute_classification_metrics(probs.float(), labels, int(c.calibration_bins))
    out.update({k: m.get(k) for k in METRICS})
    out["aleatoric"] = float(unc["expected_entropy"].mean())
    out["epistemic"] = float(unc["mutual_information"].mean())
    if cal is not None:
        cols = [f"{method}/{'scaled' if scaled else 'raw'}/p{k}" for k in range(probs.shape[1])]
        if all(col in cal for col in cols):
            alpha = cp.check_alpha(c.conformal.alpha, "evaluation.conformal.alpha")
            pc, yc = cal[cols].to_numpy(), cal["label"].to_numpy().astype(int)
            if len(yc) >= cp.min_calibration_size(alpha):
                for i, name in enumerate(c.conformal.methods):
                    kw = {"k_reg": int(c.conformal.raps_k_reg), "lam": float(c.conformal.raps_lambda)}
                    q = cp.fit_sets(pc, yc, alpha, str(name), seed=int(c.mc_seed) + i, **kw)
                    s = cp.set_summary(cp.predict_sets(probs.numpy(), q, str(name), seed=int(c.mc_seed) + 100 + i,
                                                       **kw), labels.numpy())
                    out[f"coverage_{name}"], out[f"set_size_{name}"] = s["coverage"], s["mean_size"]
    return out


def _variants(spec: Mapping[str, Any]) -> list[tuple[bool, bool]]:
    bn, em = bool(spec.get("adapt_bn")), spec.get("label_shift") == "em"
    return [(a, e) for a in ((False, True) if bn else (False,)) for e in ((False, True) if em else (False,))]


def variant_name(bn: bool, em: bool) -> str:
    return "+".join(n for n, on in (("adapt_bn", bn), ("em", em)) if on) or "as trained"


def fit_recalibrators(cal: pd.DataFrame | None, c: Any) -> dict[str, dict[str, Any]]:
    """netcal's recalibrators of every method, fitted on the calibration split's unscaled probabilities."""
    from medtrust.metrics import recalibration

    names = list(c.get("recalibration") or [])
    if cal is None or not names:
        return {}
    out = {}
    for method in sorted({col.split("/")[0] for col in cal.columns if "/raw/" in col}):
        cols = sorted((col for col in cal.columns if col.startswith(f"{method}/raw/")), key=lambda x: int(x.rsplit("p", 1)[1]))
        out[method] = recalibration.fit(cal[cols].to_numpy(), cal["label"].to_numpy(), names, int(c.recalibration_bins))
    return out


def recalibrated_rows(samples: torch.Tensor, labels: torch.Tensor, fitted: Mapping[str, Any], n_bins: int) -> list[dict[str, Any]]:
    """Metrics of one method's unscaled probabilities after each fitted recalibrator."""
    from medtrust.metrics import recalibration
    from medtrust.metrics.classification import compute_classification_metrics

    raw = torch.softmax(samples.double(), -1).mean(0).numpy()
    rows = []
    for name, q in recalibration.apply(fitted, raw).items():
        m = compute_classification_metrics(torch.from_numpy(q).float(), labels, n_bins)
        rows.append({"recalibration": name, **{k: m.get(k) for k in METRICS}})
    return rows


def score_condition(task: torch.nn.Module, loader: Any, labels: torch.Tensor, c: Any, fitted: Mapping[str, Any],
                    cal: pd.DataFrame | None, spec: Mapping[str, Any], seed: int,
                    recal: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Rows (variant × method × recalibration: none, temperature, netcal's) of one set of images."""
    from medtrust.evaluation.classification import method_logits
    from medtrust.evaluation.ood import collect_outputs

    temps = dict(fitted.get("temperatures") or {})
    prior = source_prior(cal, int(getattr(task, "num_classes", 2))) if cal is not None else None
    rows = []
    for bn, em in _variants(spec):
        if em and prior is None:
            raise ValueError("shift.label_shift=em needs the run's calibration_predictions.csv (its class priors): "
                             "evaluate.py ... refit=true writes it")
        model = adapt_bn(task, loader)[0] if bn else task
        coll = collect_outputs(model, loader, seed, features=False)
        for method, samples in method_logits(model, coll).items():
            for scaled in (False, True):
                if scaled and method not in temps:
                    continue
                t = float(temps[method]) if scaled else 1.0
                rows.append({"variant": variant_name(bn, em), "method": method, "temperature_scaled": scaled,
                             "recalibration": "temperature" if scaled else "none",
                             **_score(samples, t, labels, prior if em else None, c, cal, method, scaled)})
            if not em and recal and method in recal:
                rows += [{"variant": variant_name(bn, em), "method": method, "temperature_scaled": False, **r}
                         for r in recalibrated_rows(samples, labels, recal[method], int(c.calibration_bins))]
    return rows


def check_spec(spec: Mapping[str, Any]) -> tuple[dict[str, Any], list[int]]:
    """The corruption table and severities ``spec`` (the ``shift`` config) asks for, checked without
    touching an image (evaluate.py calls it before the evaluation, so a typo costs seconds).

    Raises:
        ValueError: unknown corruptions or parameters, severities outside 1..5, prevalence ratios outside (0, 1).
    """
    from medtrust.data.corruptions import check_table

    for r in spec.get("prevalence") or []:
        if not 0 < float(r) < 1:
            raise ValueError(f"shift.prevalence ratios must lie in (0, 1), got {r}")
    if not spec.get("corruptions"):
        return {}, []
    table = check_table(dict(spec["corruptions"]))
    if spec.get("only"):
        unknown = [n for n in spec["only"] if n not in table]
        if unknown:
            raise ValueError(f"shift.only: {unknown} not in shift.corruptions {sorted(table)}")
        table = {n: table[n] for n in spec["only"]}
    sev = [int(s) for s in spec.get("severities", [1, 2, 3, 4, 5])]
    if not sev or any(s not in range(1, 6) for s in sev):
        raise ValueError(f"shift.severities must be values in 1..5, got {sev}")
    return table, sev


def corruption_benchmark(task: torch.nn.Module, dm: Any, split: str, out_dir: str | Path, c: Any,
                         fitted: Mapping[str, Any] | None, spec: Mapping[str, Any]) -> dict[str, Any]:
    """Every condition × variant × method on ``split``: ``metrics/shift.json``, ``metrics/shift_corruptions.csv``
    and ``figures/shift/corruptions.png``.

    Raises:
        ValueError: unknown corruptions, severities outside 1..5, or an unlabelled split.
    """
    from medtrust.data.corruptions import corrupt, describe
    from medtrust.evaluation.classification import CAL_PREDICTIONS_FILE
    from medtrust.utils.io import write_csv, write_json

    fitted = dict(fitted or {})
    table, sev = check_spec(spec)
    labels_ = [r.get("label") for r in dm.load_split(split)[2]]
    if any(y is None for y in labels_):
        raise ValueError(f"shift=corruptions needs labelled images; split {split!r} has images without a label")
    labels = torch.tensor(labels_, dtype=torch.long)
    cal_path = Path(str(fitted.get("dir", ""))) / CAL_PREDICTIONS_FILE
    cal = pd.read_csv(cal_path) if fitted.get("dir") and cal_path.is_file() else None
    seed = int(spec.get("seed", 0))
    recal = fit_recalibrators(cal, c)
    rows = []
    conditions = [("clean", 0)] + [(n, s) for n in table for s in sev]
    for k, (name, s) in enumerate(conditions):
        ds = dm.dataset(split) if s == 0 else dm.mapped_dataset(
            split, lambda i, im, n=name, p=table[name][s - 1], kk=k: corrupt(im, n, p, seed * 1_000_003 + kk * 10_007 + i))
        loader = eval_loader(ds, dm.eval_batch_size)
        for r in score_condition(task, loader, labels, c, fitted, cal, spec, int(c.mc_seed), recal):
            rows.append({"corruption": name, "severity": s, "parameter": None if s == 0 else table[name][s - 1], **r})
        log.info(f"shift: {name} severity {s} ({k + 1}/{len(conditions)})")
    df = pd.DataFrame(rows)
    mdir = Path(out_dir) / "metrics"
    write_csv(mdir / "shift_corruptions.csv", df)
    keys = ["variant", "method", "recalibration"]
    summary = (df.groupby([*keys, "severity"])[[m for m in (*METRICS, "aleatoric", "epistemic") if m in df]]
               .mean(numeric_only=True).reset_index())
    worst = df[df["severity"] == max(sev)].groupby(keys)["ece_top_label"].mean().sort_values()
    head = worst.index[0]
    result = {"split": split, "n_images": int(len(labels)), "corruptions": describe(table), "severities": sev,
              "variants": sorted(df["variant"].unique().tolist()),
              "calibration_predictions": str(cal_path) if cal is not None else None,
              "by_severity": summary.to_dict("records"),
              "headline": {"best_calibrated_at_severity": max(sev), "variant": head[0], "method": head[1],
                           "recalibration": head[2], "mean_ece": float(worst.iloc[0]),
                           "recalibrators_fitted_on": "the calibration split's unscaled probabilities" if recal else None,
                           "ranking": [{"variant": v, "method": m, "recalibration": r, "mean_ece": float(e)}
                                       for (v, m, r), e in worst.items()]},
              "note": "means over the corruptions at each severity; severity 0 = clean images"}
    if spec.get("figures", True):
        from medtrust.report import figures

        result["figures"] = [str(figures.plot_shift_boxes(df, Path(out_dir) / "figures" / "shift" / "corruptions.png"))]
    write_json(mdir / "shift.json", result)
    log.info(f"shift: best calibrated at severity {max(sev)}: {head} (mean ECE {float(worst.iloc[0]):.4f})")
    return result


def prevalence_shift(task: torch.nn.Module, dm: Any, split: str, c: Any, fitted: Mapping[str, Any] | None,
                     ratios: Sequence[float], seed: int = 0) -> list[dict[str, Any]]:
    """Resample ``split`` (binary labels) to each positive-class share in ``ratios`` (the largest subset
    with that share, without replacement) and score it as trained and with the EM correction."""
    from medtrust.evaluation.classification import CAL_PREDICTIONS_FILE

    fitted = dict(fitted or {})
    cal_path = Path(str(fitted.get("dir", ""))) / CAL_PREDICTIONS_FILE
    if not fitted.get("dir") or not cal_path.is_file():
        raise ValueError(f"shift.prevalence needs the run's {CAL_PREDICTIONS_FILE} (evaluate.py ... refit=true)")
    cal = pd.read_csv(cal_path)
    labels = np.array([r.get("label") for r in dm.load_split(split)[2]])
    if set(np.unique(labels)) - {0, 1}:
        raise ValueError("shift.prevalence resamples two-class data only")
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    rows = []
    ds = dm.dataset(split)
    for r in ratios:
        r = float(r)
        if not 0 < r < 1:
            raise ValueError(f"shift.prevalence ratios must lie in (0, 1), got {r}")
        n = int(min(len(pos) / r, len(neg) / (1 - r)))
        idx = np.sort(np.r_[rng.choice(pos, int(round(n * r)), replace=False),
                            rng.choice(neg, n - int(round(n * r)), replace=False)])
        loader = eval_loader(torch.utils.data.Subset(ds, idx.tolist()), dm.eval_batch_size)
        spec = {"label_shift": "em", "adapt_bn": False}
        for row in score_condition(task, loader, torch.as_tensor(labels[idx], dtype=torch.long), c, fitted, cal, spec,
                                   int(c.mc_seed)):
            rows.append({"positive_share": r, "n_images": len(idx), "source_positive_share": float(source_prior(cal, 2)[1]),
                         **row})
    return rows
