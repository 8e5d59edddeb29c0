"""Raters of heatmap relevance (SAFEGEN's Likert survey): import, agreement, and the correlation of the
ratings with the detector's map.

A ratings CSV has the columns ``image_id,region,rater,score`` (score an integer on a Likert scale, 1-5 by
default): how strongly a rater finds ``region`` of ``image_id`` indicative of a synthetic distortion.
Agreement between raters is Krippendorff's α (ordinal, the ``krippendorff`` package, bootstrap CI over
rated units; :func:`medtrust.data.sources.ratings.krippendorff_alpha`) and, as in the seed, Wilcoxon
signed-rank tests between each pair of raters on the units both rated (a systematic offset between two
raters shows as a small p). The correlation with the detector is Spearman's ρ between each unit's mean
rating and the detector's mean value in that region. :func:`simulate_region_raters` draws raters of known
noise and bias, for tests.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import spearmanr, wilcoxon

from medtrust.data.sources.ratings import krippendorff_alpha

COLUMNS = ("image_id", "region", "rater", "score")


def read_region_ratings(path: str | Path, scale: Sequence[int] = (1, 5)) -> pd.DataFrame:
    """Read and check a ratings CSV.

    Raises:
        ValueError: a missing column, a blank cell, a score that is not an integer on the scale, or a rater
            rating one region twice -- naming the CSV row (1 = the first data row) and what was expected.
    """
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as err:
        raise ValueError(f"{path}: not a readable CSV ({err})") from err
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected {list(COLUMNS)} (found {list(df.columns)})")
    lo, hi = int(scale[0]), int(scale[1])
    for i, row in df.iterrows():
        where = f"{path}, row {i + 1}"
        blank = [c for c in COLUMNS if not str(row[c]).strip()]
        if blank:
            raise ValueError(f"{where}: blank {blank}")
        s = str(row["score"]).strip()
        if not s.lstrip("-").isdigit() or not lo <= int(s) <= hi:
            raise ValueError(f"{where}: score {s!r}; expected an integer {lo}-{hi}")
    df = df[list(COLUMNS)].assign(score=df["score"].astype(int))
    dup = df.duplicated(["image_id", "region", "rater"], keep=False)
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[1])
        r = df.iloc[i]
        raise ValueError(f"{path}, row {i + 1}: rater {r['rater']!r} rates region {r['region']!r} of image "
                         f"{r['image_id']!r} twice")
    return df


def agreement(df: pd.DataFrame, n_boot: int = 200, seed: int = 0) -> dict[str, Any]:
    """Krippendorff's α (ordinal) with its CI, and pairwise Wilcoxon signed-rank tests between raters."""
    long = df.assign(image=df["image_id"].astype(str) + "|" + df["region"].astype(str), rating=df["score"])
    out = {"krippendorff": krippendorff_alpha(long[["image", "rater", "rating"]], "ordinal", n_boot, seed)}
    wide = long.pivot_table(index="image", columns="rater", values="rating", aggfunc="first")
    pairs = {}
    for a, b in combinations(sorted(wide.columns), 2):
        both = wide[[a, b]].dropna()
        d = both[a] - both[b]
        if len(both) < 2 or not d.any():
            pairs[f"{a} vs {b}"] = {"n": int(len(both)), "p": 1.0 if len(both) else None, "median_diff": 0.0}
            continue
        r = wilcoxon(both[a], both[b])
        pairs[f"{a} vs {b}"] = {"n": int(len(both)), "statistic": float(r.statistic), "p": float(r.pvalue),
                                "median_diff": float(np.median(d))}
    out["wilcoxon_pairs"] = pairs
    return out


def correlation_with_map(df: pd.DataFrame, map_values: Mapping[tuple[str, str], float],
                         groups: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Spearman ρ between each (image, region)'s mean rating and the detector's value there, overall and
    per group of images (e.g. artifact cohort: ``groups[image_id]``)."""
    mean = df.groupby(["image_id", "region"])["score"].mean()
    keys = [k for k in mean.index if k in map_values]
    if not keys:
        raise ValueError("no rated (image_id, region) has a detector value (check the image ids and region names)")
    r = np.array([mean[k] for k in keys], float)
    m = np.array([map_values[k] for k in keys], float)

    def rho(sel: np.ndarray) -> dict[str, Any]:
        if sel.sum() < 3 or np.ptp(r[sel]) == 0 or np.ptp(m[sel]) == 0:
            return {"n": int(sel.sum()), "rho": None}
        res = spearmanr(r[sel], m[sel])
        return {"n": int(sel.sum()), "rho": float(res.statistic), "p": float(res.pvalue)}

    out: dict[str, Any] = {"overall": rho(np.ones(len(keys), bool)), "missing": int(len(mean) - len(keys))}
    if groups:
        g = np.array([groups.get(k[0], "?") for k in keys], dtype=object)
        out["groups"] = {str(name): rho(g == name) for name in sorted(set(g.tolist()))}
    return out


def simulate_region_raters(truth: Mapping[tuple[str, str], float], raters: Sequence[Mapping[str, float]],
                           scale: Sequence[int] = (1, 5), seed: int = 0) -> pd.DataFrame:
    """Ratings of simulated raters: each sees the true relevance (on the scale) plus its own bias and
    Gaussian noise (``{"sigma", "bias"}``), rounded and clipped to the scale."""
    rng = np.random.default_rng(seed)
    rows = []
    for j, spec in enumerate(raters):
        for (image_id, region), t in truth.items():
            s = float(t) + float(spec.get("bias", 0.0)) + rng.normal(0.0, float(spec.get("sigma", 0.0)))
            rows.append({"image_id": image_id, "region": region, "rater": f"r{j + 1}",
                         "score": int(np.clip(np.rint(s), scale[0], scale[1]))})
    return pd.DataFrame(rows, columns=list(COLUMNS))
