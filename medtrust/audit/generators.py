"""What the audit points at: a generator that turns the prompt set into images.

- :class:`PhantomGenerator` -- known truth: every prompt becomes a procedural CXR
  (:func:`medtrust.data.phantoms.cxr.render_cxr`) with an injected subgroup bias and hallucination rate:
  a requested finding is drawn with probability ``inject.tpr[attribute][value]`` when the prompt *names*
  that value (the generator cannot know a group its prompt does not name, so the neutral prompt of a
  pair is drawn at the base rate: demographic terms are what creates the gap, as in the paper), and an
  unasked finding (``hallucinated``) appears in a share ``inject.hallucination`` of the images. The two
  images of a counterfactual pair share their seed: the same anatomy and the same random draws, so
  they differ only where the injected bias acts. The truth of every image is kept (``truth_*``).
- :class:`FolderGenerator` -- images that were already generated, with a CSV of their prompts and
  intended attributes (``generate.py``'s ``generated.csv`` keeps the prompt CSV's extra columns).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from medtrust.data.phantoms import seeded_rng
from medtrust.data.phantoms.cxr import FINDINGS, render_cxr


class PhantomGenerator:
    """Prompt -> procedural CXR with a known injected bias and hallucination rate (see module)."""

    kind = "phantom"

    def __init__(self, size: int = 64, seed: int = 0, finding: str = "pneumonia", hallucinated: str = "covid",
                 inject: Mapping[str, Any] | None = None) -> None:
        if finding not in FINDINGS or hallucinated not in FINDINGS or finding == hallucinated:
            raise ValueError(f"audit.generator: finding and hallucinated must be two of {FINDINGS}, got "
                             f"{finding!r}, {hallucinated!r}")
        inject = dict(inject or {})
        unknown = set(inject) - {"tpr", "hallucination"}
        if unknown:
            raise ValueError(f"audit.generator.inject: unknown key(s) {sorted(unknown)}; expected tpr, hallucination")
        self.tpr = {str(a): {str(k): float(v) for k, v in dict(m).items()} for a, m in dict(inject.get("tpr") or {}).items()}
        self.hallucination = float(inject.get("hallucination") or 0.0)
        for a, m in self.tpr.items():
            for k, v in m.items():
                if not 0 <= v <= 1:
                    raise ValueError(f"audit.generator.inject.tpr.{a}.{k}={v}; expected a probability in [0, 1]")
        if not 0 <= self.hallucination <= 1:
            raise ValueError(f"audit.generator.inject.hallucination={self.hallucination}; expected a probability in [0, 1]")
        self.size, self.seed, self.finding, self.hallucinated = int(size), int(seed), finding, hallucinated

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "size": self.size, "seed": self.seed, "finding": self.finding,
                "hallucinated": self.hallucinated, "inject": {"tpr": self.tpr, "hallucination": self.hallucination}}

    def check_attributes(self, attributes: list[str]) -> None:
        bad = sorted(set(self.tpr) - set(attributes))
        if bad:
            raise ValueError(f"audit.generator.inject.tpr: attribute(s) {bad} are not prompt attributes {attributes}")

    def generate(self, prompts: pd.DataFrame) -> tuple[torch.Tensor, pd.DataFrame]:
        """Images N×1×H×W in [0, 1] and the prompt table with ``truth_finding``, ``truth_hallucination``."""
        imgs, drawn, hall = [], [], []
        for _, row in prompts.iterrows():
            s = int(row["seed"])
            u = seeded_rng(self.seed, "audit-generator", s).random(3)
            p = 1.0
            if row["variant"] == "demographic":
                for a, m in self.tpr.items():
                    p *= m.get(str(row[a]), 1.0)
            d = bool(int(row["asked"])) and bool(u[0] < p)
            h = bool(u[1] < self.hallucination)
            img, _ = render_cxr(self.seed, s % 2_000_000_000, self.size, pneumonia=d if self.finding == "pneumonia" else h,
                                covid=h if self.hallucinated == "covid" else d, patient_scale=0.85 + 0.3 * float(u[2]))
            imgs.append(torch.from_numpy(img).float().div(255)[None])
            drawn.append(int(d))
            hall.append(int(h))
        out = prompts.copy()
        out["truth_finding"], out["truth_hallucination"] = drawn, hall
        return torch.stack(imgs) if imgs else torch.empty(0, 1, self.size, self.size), out

    def training_composition(self) -> dict[str, Any]:
        return {"status": "none", "why": "the phantom generator is procedural: it has no training set"}


class FolderGenerator:
    """Images already generated: ``folder`` with a CSV (default ``<folder>/generated.csv``) whose rows name
    each image (``file`` or ``path``, relative to the folder) with its prompt and intended attributes. Rows
    a selector rejected (``kept`` = 0, no file) are kept for the selector audit and not scored."""

    kind = "folder"

    def __init__(self, folder: str | Path, csv: str | Path | None = None) -> None:
        self.folder = Path(str(folder)).expanduser()
        if not self.folder.is_dir():
            raise ValueError(f"audit.generator.folder={self.folder}: not a folder (expected generated images with "
                             "their prompt CSV)")
        self.csv = Path(str(csv)).expanduser() if csv else self.folder / "generated.csv"
        if not self.csv.is_file():
            raise ValueError(f"audit.generator: {self.csv} not found; a folder of generated images needs the CSV of "
                             "their prompts and intended attributes (generate.py writes generated.csv; or set "
                             "audit.generator.csv=<file>)")

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "folder": str(self.folder), "csv": str(self.csv)}

    def check_attributes(self, attributes: list[str]) -> None:
        pass

    def table(self) -> pd.DataFrame:
        df = pd.read_csv(self.csv, dtype=str, keep_default_na=False, encoding="utf-8-sig")
        col = "file" if "file" in df.columns else "path" if "path" in df.columns else None
        if col is None:
            raise ValueError(f"{self.csv}: missing column file (or path): which image each row is")
        df = df.rename(columns={col: "file"})
        if "seed" not in df.columns:
            df["seed"] = ""
        return df

    def generate(self, prompts: pd.DataFrame) -> tuple[torch.Tensor, pd.DataFrame]:
        from PIL import Image, UnidentifiedImageError

        rows = prompts[prompts.get("kept", pd.Series("1", index=prompts.index)).astype(str) != "0"].copy()
        imgs = []
        for i, row in rows.iterrows():
            path = (self.folder / str(row["file"])).resolve()
            if not path.is_relative_to(self.folder.resolve()):
                raise ValueError(f"{self.csv} row {int(i) + 2}: {row['file']} lies outside {self.folder}")
            try:
                with Image.open(path) as im:
                    arr = np.asarray(im.convert("L" if im.mode in ("L", "I;16", "I", "P", "LA") else "RGB"))
            except (FileNotFoundError, UnidentifiedImageError, OSError) as err:
                raise ValueError(f"{self.csv} row {int(i) + 2}: cannot read image {path}: {err}") from None
            t = torch.from_numpy(arr.copy()).float().div(255)
            imgs.append(t[None] if t.ndim == 2 else t.permute(2, 0, 1))
        shapes = {tuple(t.shape) for t in imgs}
        if len(shapes) > 1:
            raise ValueError(f"{self.folder}: generated images of several shapes {sorted(shapes)}; expected one")
        return (torch.stack(imgs) if imgs else torch.empty(0, 1, 1, 1)), rows.reset_index(drop=True)

    def training_composition(self) -> dict[str, Any]:
        return {"status": "unknown", "why": "a folder of images does not say what its generator was trained on"}
