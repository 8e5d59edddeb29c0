"""Ratings of images (``path,rating[,rater]``) as a classification data set: the training data of
MINIM's quality selector.

Several raters may rate one image. Their agreement is Krippendorff's α (ordinal; the ``krippendorff``
package) with a bootstrap CI over images, and the selector trains on the images' mean rating
(``aggregate: mean``, rounded half up), their median, or on every rating as its own sample
(``aggregate: each``; the ratings of one image stay in one split). A rating ``r`` is class
``r - scale[0]``.

When the images are the output of ``generate.py`` (a ``generated*.csv`` in ``images`` or next to the
ratings CSV), every rated path must be one of its images, and the image's prompt row, modality and
prompt attributes (``sex``, ``age_group`` ...) come from it: the samples of one prompt are one
"patient" of the split, and the selector's calibration and subgroup gaps are reported per modality
and per subgroup like any classifier's.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medtrust.data.records import DataError, Record
from medtrust.data.tables import read_table
from medtrust.data.sources.csv import record_id

AGGREGATES = ("mean", "median", "each")
REQUIRED = ("path", "rating")


def krippendorff_alpha(table: pd.DataFrame, level: str = "ordinal", n_boot: int = 200, seed: int = 0) -> dict[str, Any]:
    """Krippendorff's α of a long table ``image, rater, rating`` (an image need not be rated by all).

    Returns:
        ``{"alpha", "ci95", "level", "n_raters", "n_images", "n_pairable"}``; α is None with fewer than
        two raters or no image rated twice (``reason`` says which). The CI is a percentile bootstrap
        over images.
    """
    import krippendorff

    raters = sorted(table["rater"].astype(str).unique())
    out: dict[str, Any] = {"level": level, "n_raters": len(raters), "n_images": int(table["image"].nunique())}
    mat = table.pivot_table(index="rater", columns="image", values="rating", aggfunc="first")
    pairable = int((mat.notna().sum(0) >= 2).sum())
    out["n_pairable"] = pairable
    if len(raters) < 2 or pairable == 0:
        return {**out, "alpha": None, "ci95": None,
                "reason": "one rater" if len(raters) < 2 else "no image rated by two raters"}
    data = mat.to_numpy(dtype=float)
    if len(np.unique(data[~np.isnan(data)])) < 2:  # every rating equal: α is undefined (0/0)
        return {**out, "alpha": None, "ci95": None, "reason": "every rating is the same value"}
    alpha = float(krippendorff.alpha(reliability_data=data, level_of_measurement=level))
    boots = []
    rng = np.random.default_rng(seed)
    for _ in range(int(n_boot)):
        cols = rng.integers(0, data.shape[1], data.shape[1])
        d = data[:, cols]
        if len(np.unique(d[~np.isnan(d)])) < 2:
            continue
        boots.append(krippendorff.alpha(reliability_data=d, level_of_measurement=level))
    ci = [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))] if len(boots) >= 20 else None
    return {**out, "alpha": alpha, "ci95": ci}


class RatingsSource:
    """Records from a ratings CSV (``path,rating[,rater]``), one per rated image (or per rating).

    Args:
        ratings: the CSV. ``path`` is relative to ``images`` (or to the CSV's folder), ``rating`` an
            integer in ``scale``, ``rater`` (optional) who rated it; other columns are ignored.
        images: the folder of the rated images (a generate.py output: its CSV gives each image's prompt
            row, modality and attributes); None: the CSV's folder.
        scale: the lowest and highest rating (MINIM: 1-3).
        aggregate: ``mean`` | ``median`` (one record per image, the rounded mean/median rating) or
            ``each`` (one record per rating).
        attr_columns: ``auto`` (every prompt-CSV column of the generated images) or a list.
        agreement_bootstrap: resamples of the CI of Krippendorff's α.

    Raises:
        DataError: a missing file or column, an empty or non-integer cell, a rating outside ``scale``,
            a path that is not a rated image (not found, or not an image of the generated CSV), the
            same rater rating one image twice -- each naming the CSV row and what was expected.
    """

    def __init__(self, ratings: str, images: str | None = None, scale: Sequence[int] = (1, 3),
                 aggregate: str = "mean", attr_columns: str | Sequence[str] = "auto",
                 agreement_bootstrap: int = 200) -> None:
        self.csv = Path(str(ratings)).expanduser().resolve()
        self.images = Path(str(images)).expanduser().resolve() if images else self.csv.parent
        lo, hi = (int(v) for v in scale)
        if lo >= hi:
            raise ValueError(f"data.source.scale={list(scale)}; expected [lowest, highest] ratings with lowest < highest")
        self.scale = (lo, hi)
        if aggregate not in AGGREGATES:
            raise ValueError(f"data.source.aggregate={aggregate!r}; expected one of {AGGREGATES}")
        self.aggregate, self.attr_columns = aggregate, attr_columns
        self.agreement_bootstrap = int(agreement_bootstrap)
        self.agreement: dict[str, Any] | None = None
        self.counts: dict[str, Any] = {}

    @property
    def num_classes(self) -> int:
        return self.scale[1] - self.scale[0] + 1

    @property
    def data_root(self) -> Path:
        """The folder every file of this source must lie in (unless ``data.allow_outside_root=true``)."""
        return self.images

    def describe(self) -> str:
        return f"ratings({self.csv}, images={self.images}, aggregate={self.aggregate})"

    def summary(self) -> dict[str, Any]:
        """What the data summary of a run adds: rating counts and the raters' agreement."""
        return {"ratings": {**self.counts, "scale": list(self.scale), "aggregate": self.aggregate,
                            "agreement": self.agreement}}

    # -- reading -----------------------------------------------------------------------------------
    def _table(self) -> pd.DataFrame:
        if not self.csv.is_file():
            raise DataError(f"ratings file not found: {self.csv} (set data.ratings=<CSV with path,rating[,rater]>)")
        df = read_table(self.csv, what="ratings file")
        missing = [c for c in REQUIRED if c not in df.columns]
        if missing:
            raise DataError(f"{self.csv}: missing column(s) {missing}; found {list(df.columns)}; expected "
                            "path,rating[,rater] (one row per rating)")
        if df.empty:
            raise DataError(f"{self.csv}: no ratings (only a header)")
        return df

    def _generated(self) -> pd.DataFrame | None:
        """The generate.py table of ``images`` indexed by absolute image path (None: plain images)."""
        from medtrust.data.sources.generated import read_generated

        if not any(self.images.glob("generated*.csv")) and not any(self.images.rglob("generated*.csv")):
            return None
        try:
            gen = read_generated(self.images)
        except (FileNotFoundError, ValueError) as err:
            raise DataError(str(err)) from err
        return gen[gen["path"] != ""].set_index("path", drop=False)

    def _rows(self, df: pd.DataFrame, known: pd.DataFrame | None) -> pd.DataFrame:
        """Check every row; the long table ``image, rater, rating, where`` (image = absolute path)."""
        lo, hi = self.scale
        has_rater = "rater" in df.columns
        out, seen = [], {}
        for i, row in enumerate(df.to_dict("records")):
            where = f"{self.csv} row {i + 2}"  # row 1 is the header
            rel, cell = row["path"].strip(), row["rating"].strip()
            if not rel:
                raise DataError(f"{where}: empty 'path' cell; expected the rated image's path")
            path = Path(rel) if Path(rel).is_absolute() else (self.images / rel)
            path = path.resolve()
            if known is not None and str(path) not in known.index:
                raise DataError(f"{where}: unknown image path {rel!r}: not an image of the generate.py CSV in "
                                f"{self.images} (expected one of its 'file' paths, e.g. {known['file'].iloc[0]!r})")
            if known is None and not path.is_file():
                raise DataError(f"{where}: unknown image path {rel!r}: no file {path}")
            try:
                value = float(cell)
            except ValueError:
                value = float("nan")
            if not math.isfinite(value) or value != int(value):
                raise DataError(f"{where}: rating {cell!r} is not an integer; expected an integer rating {lo}-{hi}")
            if not lo <= int(value) <= hi:
                raise DataError(f"{where}: rating {int(value)} is outside the scale {lo}-{hi} (data.source.scale)")
            rater = row["rater"].strip() if has_rater else "rater1"
            if not rater:
                raise DataError(f"{where}: empty 'rater' cell; expected who rated the image")
            key = (str(path), rater)
            if key in seen:
                raise DataError(f"{where}: {rater} rated {rel!r} already in row {seen[key]}; expected one rating per "
                                "rater and image")
            seen[key] = i + 2
            out.append({"image": str(path), "rel": rel, "rater": rater, "rating": int(value), "where": where})
        return pd.DataFrame(out)

    # -- records -----------------------------------------------------------------------------------
    def records(self) -> list[Record]:
        known = self._generated()
        long = self._rows(self._table(), known)
        self.agreement = krippendorff_alpha(long, "ordinal", self.agreement_bootstrap)
        per_image = long.groupby("image", sort=False)
        self.counts = {"n_ratings": int(len(long)), "n_images": int(per_image.ngroups),
                       "n_raters": int(long["rater"].nunique()),
                       "ratings_per_image": float(len(long) / max(per_image.ngroups, 1)),
                       "rating_counts": {str(k): int(v) for k, v in long["rating"].value_counts().sort_index().items()}}
        attrs_of = self._attributes(known)
        lo = self.scale[0]
        out: list[Record] = []
        for image, grp in per_image:
            rel = str(grp["rel"].iloc[0])
            base = {"mask_path": None, "split": None, "path": image, "where": str(grp["where"].iloc[0])}
            group, attrs = attrs_of(image, rel)
            if self.aggregate == "each":
                for r in grp.itertuples():
                    out.append({**base, "id": f"{record_id(rel, self.images)}#{r.rater}", "label": int(r.rating) - lo,
                                "patient_id": group, "attrs": {**attrs, "rater": str(r.rater)}, "where": r.where})
                continue
            vals = grp["rating"].to_numpy(float)
            centre = vals.mean() if self.aggregate == "mean" else float(np.median(vals))
            rating = int(math.floor(centre + 0.5))  # half up: a 2.5 mean is a 3
            out.append({**base, "id": record_id(rel, self.images), "label": rating - lo, "patient_id": group,
                        "attrs": attrs})
        # the make-up of the rated images (what the selector learns from), per attribute
        by: dict[str, dict[str, int]] = {}
        for rec in out if self.aggregate != "each" else {r["path"]: r for r in out}.values():
            for k, v in rec["attrs"].items():
                if k != "rater":
                    by.setdefault(k, {}).setdefault(v, 0)
                    by[k][v] += 1
        self.counts["images_by_attribute"] = {k: dict(sorted(v.items())) for k, v in sorted(by.items())}
        return out

    def _attributes(self, known: pd.DataFrame | None):
        from medtrust.data.sources.generated import attribute_columns

        if known is None:
            return lambda image, rel: (record_id(rel, self.images), {})
        cols = attribute_columns(known, self.attr_columns)

        def of(image: str, rel: str) -> tuple[str, dict[str, str]]:
            row = known.loc[image]
            attrs = {"modality": str(row["modality"]), **{c: str(row[c]).strip() or "unknown" for c in cols}}
            return f"prompt{int(row['row'])}", attrs
        return of
