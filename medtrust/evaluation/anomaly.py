"""Evaluation of a SAFEGEN anomaly run on one split: the artifact benchmark built from the split's clean
images (held out from training), every image scored against the clean real statistics of the run.

Writes ``metrics/<split>.json`` (``overall`` and ``cohorts.<name>``, each with ``auroc``, ``auroc_ci``,
``pixel_auroc``, ``dice``, ``iou``, ``pointing_game``, ``relevance_mass``, ``spearman_severity``,
``spearman_map_mask``, flagged shares; all of the residual score), ``detectors.{residual, contrastive,
fused, raw_residual}`` (image AUROC of each score, overall and per cohort), ``metrics/<split>_benchmark.csv`` (one row
per image) and a figure of example maps per cohort.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from medtrust.anomaly.scoring import AnomalyStats
from medtrust.data.artifacts import ArtifactSpec, build_benchmark
from medtrust.evaluation.config import to_plain
from medtrust.metrics.anomaly import auroc_with_ci, benchmark_metrics, kind_aurocs
from medtrust.tasks.base import EvalResult
from medtrust.utils.io import write_csv, write_json
from medtrust.utils.logging import get_logger

log = get_logger(__name__)


def _normalise(img: np.ndarray, normalize: Mapping[str, Any] | None) -> torch.Tensor:
    """H×W×C float in [0, 1] -> C×H×W in the model's range."""
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float()
    if normalize is None:
        return x
    mean = torch.tensor(list(normalize["mean"]), dtype=x.dtype).view(-1, 1, 1)
    std = torch.tensor(list(normalize["std"]), dtype=x.dtype).view(-1, 1, 1)
    return (x - mean) / std


def split_benchmark(dm: Any, split: str, spec: ArtifactSpec) -> list[dict[str, Any]]:
    """The artifact benchmark built from the clean images of ``split`` (H×W×C in [0, 1]), ids from its records."""
    imgs, _, recs = dm.load_split(split)
    clean = [t.float().div(255).permute(1, 2, 0).numpy() for t in imgs]
    return build_benchmark(clean, spec, ids=[str(r["id"]) for r in recs])


def score_images(task: Any, images: list[np.ndarray], normalize: Mapping[str, Any] | None, stats: AnomalyStats,
                 batch_size: int = 32) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, Any]]:
    """Image scores (``residual``: top-k % of the z-residual; ``raw_residual``: the same image score of
    the residual standardised by one global mean and std instead of per pixel; and
    with a k-NN reference ``contrastive`` and ``fused``; N each) and
    z-residual maps (N×H×W) of images H×W×C in [0, 1]."""
    scores: dict[str, list[np.ndarray]] = {"residual": [], "raw_residual": [], "contrastive": [], "fused": []}
    maps, info = [], {}
    for i in range(0, len(images), batch_size):
        x = torch.stack([_normalise(im, normalize) for im in images[i:i + batch_size]])
        task.check_input(x, "benchmark images")
        res, info = task.residuals(x)
        s = stats.image_scores(res)
        scores["residual"].append(s.numpy())
        scores["raw_residual"].append(stats.raw_scores(res).numpy())  # no per-pixel z-scoring: the baseline
        if stats.reference is not None:
            knn = stats.knn_scores(task.embeddings(x))
            scores["contrastive"].append(knn.numpy())
            scores["fused"].append(stats.fused(s, knn).numpy())
        maps.append(stats.zscore(res).numpy())
    info = {k: v for k, v in info.items() if k != "reconstruction"}
    return {k: np.concatenate(v) for k, v in scores.items() if v}, np.concatenate(maps), info


def evaluate_anomaly(task: Any, dm: Any, split: str, out_dir: Path, evaluation: Any, extra: Mapping[str, Any] | None,
                     stats: AnomalyStats) -> EvalResult:
    ev = to_plain(evaluation) if evaluation is not None else {}
    spec = ArtifactSpec.from_config(ev.get("artifacts"), "evaluation.artifacts")
    rows = split_benchmark(dm, split, spec)
    log.info(f"artifact benchmark on {split}: {sum(r['label'] == 0 for r in rows)} clean + "
             f"{sum(r['label'] == 1 for r in rows)} injected images ({list(spec.cohorts)}, severities {list(spec.severities)})")
    detector_scores, maps, info = score_images(task, [r["image"] for r in rows], dm.normalize, stats,
                                               int(ev.get("batch_size", 32)))
    scores = detector_scores["residual"]
    labels = np.array([r["label"] for r in rows])
    cohorts = [r["cohort"] for r in rows]
    sev = np.array([r["severity"] for r in rows])
    masks = np.stack([r["mask"] for r in rows])
    res = benchmark_metrics(scores, labels, cohorts, sev, maps, masks, pixel_threshold=stats.pixel_threshold,
                            image_threshold=stats.image_threshold, n_boot=int(ev.get("bootstrap", 1000)),
                            seed=int(spec.seed))
    detectors = {}
    for name, s in detector_scores.items():  # image AUROC of each detector, overall and per cohort
        cl = labels == 0
        detectors[name] = {"overall": dict(zip(("auroc", "auroc_ci"), auroc_with_ci(s, labels, int(ev.get("bootstrap", 1000)),
                                                                                    int(spec.seed)))), "cohorts": {}}
        for c in res["cohorts"]:
            sel = cl | ((np.asarray(cohorts) == c) & (labels == 1))
            detectors[name]["cohorts"][c] = dict(zip(("auroc", "auroc_ci"), auroc_with_ci(
                s[sel], labels[sel], int(ev.get("bootstrap", 1000)), int(spec.seed))))
    per = pd.DataFrame({"id": [r["id"] for r in rows], "source": [r["source"] for r in rows], "label": labels,
                        "cohort": cohorts, "kind": [r["kind"] for r in rows], "severity": sev, "score": scores,
                        **{f"score_{k}": v for k, v in detector_scores.items() if k != "residual"},
                        "flagged": (scores > stats.image_threshold).astype(int) if stats.image_threshold is not None else -1,
                        "mask_pixels": masks.reshape(len(masks), -1).sum(1)})
    out_dir = Path(out_dir)
    table = write_csv(out_dir / "metrics" / f"{split}_benchmark.csv", per)
    figures = []
    if ev.get("figures", True):
        figures.append(_figure(rows, maps, scores, out_dir / "figures" / split / "anomaly_maps.png",
                               int(ev.get("n_show", 4)), split))
        figures.append(_roc_figure(scores, labels, np.asarray(cohorts, dtype=object),
                                   out_dir / "figures" / split / "anomaly_roc.png", split))
    o = res["overall"]
    metrics: dict[str, Any] = {
        "split": split, "task": task.task_name, "metric_group": task.metric_group, "metric_groups": ["anomaly"],
        "n_images": int(len(rows)),
        "anomaly": {k: o[k] for k in ("auroc", "pixel_auroc", "dice", "iou", "pointing_game", "spearman_severity")
                    if isinstance(o.get(k), (int, float))},
        "overall": o, "cohorts": res["cohorts"], "detectors": detectors,
        "kinds": kind_aurocs(scores, labels, [r["kind"] for r in rows], sev, int(ev.get("bootstrap", 1000)), int(spec.seed)),
        "benchmark": {"cohorts": list(spec.cohorts), "severities": list(spec.severities),
                      "per_severity": spec.per_severity, "n_clean": int((labels == 0).sum()), "seed": spec.seed,
                      "built_from": f"the {split} rows of {dm.source.describe()}"},
        "reconstruction": {**info, **task.reconstruction_summary()},
        "fitted": {"statistics_fitted_on": stats.fitted_on, "n_clean_images": stats.n_images,
                   "n_threshold_images": stats.n_threshold_images, "thresholds_in_sample": stats.thresholds_in_sample,
                   "image_threshold": stats.image_threshold, "pixel_threshold": stats.pixel_threshold,
                   "in_sample": stats.fitted_on == split, "image_score": stats.image_score,
                   "excess_z": stats.excess_z, "top_k_percent": stats.top_k_percent, "noise_levels": stats.n_scales},
        "data": dm.summary(), "tables": {"benchmark": str(table)},
        "trust_thresholds": dict(ev.get("trust") or {}), **dict(extra or {})}
    if ev.get("generated"):
        metrics["generated"] = score_generated(task, dm, stats, ev["generated"], scores[labels == 0], out_dir, split,
                                               int(ev.get("bootstrap", 1000)), int(spec.seed))
    if ev.get("ratings"):
        metrics["raters"] = rate_maps(ev["ratings"], rows, maps, int(ev.get("rating_grid", 4)),
                                      int(ev.get("bootstrap", 1000)), int(spec.seed))
    write_json(out_dir / "metrics" / f"{split}.json", metrics)
    return EvalResult(split, task.task_name, task.metric_group, metrics, {"benchmark": table}, figures)


def region_values(z: np.ndarray, mask: np.ndarray, grid: int) -> dict[str, float]:
    """The map's mean in each rateable region of one image: ``artifact`` (its mask; absent for clean
    images), ``background`` (the rest) and the cells ``r<i>c<j>`` of a ``grid`` × ``grid`` grid."""
    out: dict[str, float] = {}
    if mask.any():
        out["artifact"] = float(z[mask].mean())
    out["background"] = float(z[~mask].mean())
    H, W = z.shape
    for i in range(grid):
        for j in range(grid):
            out[f"r{i}c{j}"] = float(z[i * H // grid:(i + 1) * H // grid, j * W // grid:(j + 1) * W // grid].mean())
    return out


def rate_maps(path: str | Path, rows: list[dict[str, Any]], maps: np.ndarray, grid: int = 4, n_boot: int = 1000,
              seed: int = 0) -> dict[str, Any]:
    """Imported Likert ratings of heatmap relevance (``image_id,region,rater,score``) against this
    benchmark's maps: agreement between raters (Krippendorff's α with CI, pairwise Wilcoxon) and
    Spearman ρ of the mean rating of each rated region with the map's mean there, overall and per cohort.

    Raises:
        ValueError: the CSV's problems (naming the row), or no rated image among the benchmark's ids.
    """
    from medtrust.anomaly.raters import agreement, correlation_with_map, read_region_ratings

    df = read_region_ratings(path)
    index = {r["id"]: i for i, r in enumerate(rows)}
    unknown = sorted(set(df["image_id"]) - set(index))
    if len(unknown) == df["image_id"].nunique():
        raise ValueError(f"{path}: none of its image ids is an image of this benchmark (e.g. {unknown[0]!r}; "
                         f"expected ids such as {rows[-1]['id']!r}, listed in metrics/<split>_benchmark.csv)")
    values: dict[tuple[str, str], float] = {}
    for image_id in set(df["image_id"]) - set(unknown):
        i = index[image_id]
        for region, v in region_values(maps[i], rows[i]["mask"], grid).items():
            values[(image_id, region)] = v
    valid = {k[1] for k in values}
    bad = sorted(set(df["region"]) - valid)
    if bad:
        raise ValueError(f"{path}: unknown region(s) {bad[:5]}; expected artifact, background or r<i>c<j> with "
                         f"i, j < {grid} (evaluation.rating_grid)")
    known = df[df["image_id"].isin(index)]
    return {"file": str(path), "n_ratings": int(len(df)), "n_raters": int(df["rater"].nunique()),
            "unknown_images": unknown, "grid": grid, **agreement(known, n_boot=min(n_boot, 500), seed=seed),
            "correlation_with_map": correlation_with_map(known, values, {r["id"]: r["cohort"] for r in rows})}


def _roc_figure(scores: np.ndarray, labels: np.ndarray, cohorts: np.ndarray, path: Path, split: str) -> Path:
    """ROC curves of the image score, overall and per cohort against the same clean images (torchmetrics)."""
    from torchmetrics.functional.classification import binary_roc

    from medtrust.metrics.anomaly import _auroc
    from medtrust.report.figures import plot_roc_curves

    curves = {}
    groups = [("overall", np.ones(len(labels), bool))] + [
        (c, (labels == 0) | ((cohorts == c) & (labels == 1))) for c in sorted(set(cohorts[labels == 1].tolist()))]
    for name, sel in groups:
        fpr, tpr, _ = binary_roc(torch.tensor(np.array(scores[sel], dtype=np.float64)), torch.tensor(labels[sel]).long())
        curves[name] = (fpr.numpy(), tpr.numpy(), _auroc(scores[sel], labels[sel]))
    return plot_roc_curves(curves, path, f"{split}: image score, injected vs clean")


def _figure(rows: list[dict[str, Any]], maps: np.ndarray, scores: np.ndarray, path: Path, n_show: int, split: str) -> Path:
    from medtrust.report.figures import plot_image_grid

    groups: dict[str, list[tuple[np.ndarray, str]]] = {}
    by_cohort: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_cohort.setdefault(r["cohort"], []).append(i)
    for cohort, idx in by_cohort.items():
        # the highest severity first: the clearest examples
        idx = sorted(idx, key=lambda i: -rows[i]["severity"])[:n_show]
        items = []
        for i in idx:
            img = rows[i]["image"]
            items.append((img if img.shape[2] == 3 else img[..., 0], f"{rows[i]['kind']} s{rows[i]['severity']}"))
            z = maps[i]
            items.append((np.clip(z / max(float(np.percentile(maps, 99.5)), 1e-6), 0, 1), f"z map, score {scores[i]:.2f}"))
        groups[cohort] = items
    return plot_image_grid(groups, path, f"{split}: artifact benchmark (image, z-residual map)")


GENERATED_KEYS = ("folder", "modality", "max_images", "resize")


def score_generated(task: Any, dm: Any, stats: AnomalyStats, cfg: Any, clean_scores: np.ndarray, out_dir: Path,
                    split: str, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The generator's samples as a fifth cohort without masks: every image of a ``generate.py`` folder
    scored like the benchmark, the share flagged at the run's image threshold (Wilson CI), its excess over
    the split's clean real images (bootstrap CI), and the AUROC of generated against clean real images.
    Writes ``metrics/<split>_generated.csv``.

    ``cfg``: a folder, or ``{folder, modality (keep one), max_images, resize (false: refuse another size)}``.

    Raises:
        ValueError: an unknown key, no image left, or an image of another size than the detector's
            without ``resize`` (naming the file).
    """
    from medtrust.data.records import read_image, resize_image
    from medtrust.data.sources.generated import read_generated
    from medtrust.metrics.selection import wilson
    from medtrust.metrics.stats import bootstrap_interval

    cfg = {"folder": cfg} if isinstance(cfg, (str, Path)) else dict(cfg)
    unknown = sorted(set(cfg) - set(GENERATED_KEYS))
    if unknown:
        raise ValueError(f"evaluation.generated: unknown key(s) {unknown}; expected {list(GENERATED_KEYS)}")
    folder = Path(str(cfg["folder"])).expanduser()
    try:
        df = read_generated(folder)
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"evaluation.generated.folder: {err}") from err
    df = df[df.path.astype(str).str.strip() != ""]
    if cfg.get("modality"):
        df = df[df.modality.astype(str) == str(cfg["modality"])]
    if cfg.get("max_images"):
        df = df.iloc[:int(cfg["max_images"])]
    if not len(df):
        raise ValueError(f"evaluation.generated: no image in {folder}" + (f" of modality {cfg['modality']!r}" if cfg.get("modality") else ""))
    size = tuple(int(v) for v in dm.image_size)
    images = []
    for path in df.path:
        arr = read_image(path, int(dm.channels))  # RGB samples are read as grayscale for a grayscale detector
        if arr.shape[:2] != size:
            if not cfg.get("resize"):
                raise ValueError(f"{path}: a generated image of {arr.shape[0]}×{arr.shape[1]}, the detector works at "
                                 f"{size[0]}×{size[1]} (set evaluation.generated.resize=true to resize)")
            arr = resize_image(arr, size)
        images.append(arr.astype(np.float32) / 255.0)
    det, _, _ = score_images(task, images, dm.normalize, stats)
    s = det["residual"]
    thr = stats.image_threshold
    flagged = (s > thr).astype(float) if thr is not None else np.full(len(s), np.nan)
    clean_flag = (clean_scores > thr).astype(float) if thr is not None else np.full(len(clean_scores), np.nan)
    out: dict[str, Any] = {"folder": str(folder), "modality": cfg.get("modality"), "n": int(len(s)),
                           "image_threshold": thr, "score_median": float(np.median(s))}
    if thr is not None:
        k = int(flagged.sum())
        out.update({"flagged": float(flagged.mean()), "flagged_ci": wilson(k, len(s)),
                    "clean_flagged": float(clean_flag.mean()), "n_clean": int(len(clean_flag)),
                    "excess": float(flagged.mean() - clean_flag.mean())})
        lo, hi, _ = bootstrap_interval(lambda a, b: float(flagged[a].mean() - clean_flag[b].mean()),
                                       [np.arange(len(s)), np.arange(len(clean_flag))], n_boot=n_boot,
                                       rng=np.random.default_rng(seed), method="percentile")
        out["excess_ci"] = [lo, hi]
    y = np.r_[np.zeros(len(clean_scores)), np.ones(len(s))]
    out["auroc_vs_clean"], out["auroc_vs_clean_ci"] = auroc_with_ci(np.r_[clean_scores, s], y, n_boot, seed)
    table = pd.DataFrame({"path": list(df.path), "modality": list(df.modality), "prompt": list(df.prompt),
                          "score": s, "flagged": flagged})
    out["table"] = str(write_csv(Path(out_dir) / "metrics" / f"{split}_generated.csv", table))
    log.info(f"generated samples ({len(s)} of {folder}): flagged {out.get('flagged')} vs clean real {out.get('clean_flagged')}")
    return out
