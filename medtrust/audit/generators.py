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
- :class:`RunGenerator` -- a project generator run (``train.py experiment=minim``), optionally with a LoRA
  folder, sampled in-process like ``generate.py``: image ``i`` of a pair gets the pair's seed, so the two
  prompts of a counterfactual pair start from the same initial noise.
- :class:`PipelineGenerator` -- a ``generate.py save_pretrained=<folder>`` pipeline folder
  (:class:`~medtrust.generation.pipeline.MedtrustLatentDiffusionPipeline`), the same way.

The phantom generator can also inject a *selector* bias (``inject.keep``: a group's images are kept with that
probability), so that the selector audit has a known truth too.
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
        unknown = set(inject) - {"tpr", "hallucination", "keep"}
        if unknown:
            raise ValueError(f"audit.generator.inject: unknown key(s) {sorted(unknown)}; expected tpr, hallucination, keep")
        self.tpr = {str(a): {str(k): float(v) for k, v in dict(m).items()} for a, m in dict(inject.get("tpr") or {}).items()}
        self.keep = {str(a): {str(k): float(v) for k, v in dict(m).items()} for a, m in dict(inject.get("keep") or {}).items()}
        self.hallucination = float(inject.get("hallucination") or 0.0)
        for name, table in (("tpr", self.tpr), ("keep", self.keep)):
            for a, m in table.items():
                for k, v in m.items():
                    if not 0 <= v <= 1:
                        raise ValueError(f"audit.generator.inject.{name}.{a}.{k}={v}; expected a probability in [0, 1]")
        if not 0 <= self.hallucination <= 1:
            raise ValueError(f"audit.generator.inject.hallucination={self.hallucination}; expected a probability in [0, 1]")
        self.size, self.seed, self.finding, self.hallucinated = int(size), int(seed), finding, hallucinated
        # the renderer's stream of its own, never a phantom_cxr data seed (0, 1, ...): generated images must not
        # repeat the anatomy of the classifiers' training images or of the real images
        self.render_seed = int(seeded_rng(self.seed, "audit-generator-render").integers(1_000_000, 2**31 - 1))

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "size": self.size, "seed": self.seed, "finding": self.finding,
                "hallucinated": self.hallucinated,
                "inject": {"tpr": self.tpr, "hallucination": self.hallucination, "keep": self.keep}}

    def check_attributes(self, attributes: list[str]) -> None:
        bad = sorted((set(self.tpr) | set(self.keep)) - set(attributes))
        if bad:
            raise ValueError(f"audit.generator.inject: attribute(s) {bad} are not prompt attributes {attributes}")

    def generate(self, prompts: pd.DataFrame) -> tuple[torch.Tensor, pd.DataFrame]:
        """Images N×1×H×W in [0, 1] and the prompt table with ``truth_finding``, ``truth_hallucination``."""
        imgs, drawn, hall, kept = [], [], [], []
        for _, row in prompts.iterrows():
            s = int(row["seed"])
            u = seeded_rng(self.seed, "audit-generator", s).random(3)
            k = 1.0
            for a, m in self.keep.items():
                k *= m.get(str(row[a]), 1.0)
            kept.append(int(seeded_rng(self.seed, "audit-selector", s, str(row["variant"])).random() < k))
            p = 1.0
            if row["variant"] == "demographic":
                for a, m in self.tpr.items():
                    p *= m.get(str(row[a]), 1.0)
            d = bool(int(row["asked"])) and bool(u[0] < p)
            h = bool(u[1] < self.hallucination)
            img, _ = render_cxr(self.render_seed, s % 2_000_000_000, self.size, pneumonia=d if self.finding == "pneumonia" else h,
                                covid=h if self.hallucinated == "covid" else d, patient_scale=0.85 + 0.3 * float(u[2]))
            imgs.append(torch.from_numpy(img).float().div(255)[None])
            drawn.append(int(d))
            hall.append(int(h))
        out = prompts.copy()
        out["truth_finding"], out["truth_hallucination"] = drawn, hall
        if self.keep:
            out["kept"] = kept
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


def _train_composition(dm: Any, attributes: list[str]) -> dict[str, Any]:
    """Counts and shares of each declared attribute's values among a generator's training images."""
    recs = dm.split_records["train"] if hasattr(dm, "split_records") else []
    out: dict[str, Any] = {"status": "ok", "n_train": len(recs), "attributes": {}}
    for a in attributes:
        vals = [str((r.get("attrs") or {}).get(a)) for r in recs if (r.get("attrs") or {}).get(a) not in (None, "")]
        if not vals:
            out["attributes"][a] = {"status": "not recorded", "why": f"the training records carry no {a!r}"}
            continue
        counts = pd.Series(vals).value_counts()
        out["attributes"][a] = {"n": int(len(vals)), "counts": {str(k): int(v) for k, v in counts.items()},
                                "shares": {str(k): float(v) / len(vals) for k, v in counts.items()}}
    return out


class RunGenerator:
    """A project generator run (optionally with a LoRA folder), sampled in-process."""

    kind = "run"

    def __init__(self, run_dir: str | Path, checkpoint: str = "best", lora: str | None = None,
                 sampling: Mapping[str, Any] | None = None, batch_size: int = 16, attributes: list[str] | None = None) -> None:
        from medtrust.runs.builders import rebuild_task, task_class
        from medtrust.runs.rundir import RunDirError, check_run_dir, find_checkpoint, load_run_config

        self.run_dir = check_run_dir(run_dir, "audit.generator.run")
        if not hasattr(task_class(self.run_dir), "generate"):
            raise RunDirError(f"audit.generator.run={self.run_dir}: not a generator run (train one with experiment=minim)")
        cfg = load_run_config(self.run_dir)
        self.ckpt = find_checkpoint(self.run_dir, checkpoint)
        self.task = rebuild_task(cfg, self.ckpt)
        self.lora = None
        if lora:
            from medtrust.generation.lora import apply_lora

            apply_lora(self.task, str(lora))
            self.lora = str(lora)
        self.sampling = self.task.sampling_record(**{k: v for k, v in dict(sampling or {}).items() if v is not None})
        self.batch_size, self.attributes = int(batch_size), list(attributes or [])

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "run_dir": str(self.run_dir), "checkpoint": str(self.ckpt), "lora": self.lora,
                "sampling": self.sampling}

    def check_attributes(self, attributes: list[str]) -> None:
        pass

    def generate(self, prompts: pd.DataFrame) -> tuple[torch.Tensor, pd.DataFrame]:
        for i, m in enumerate(prompts["modality"]):
            try:
                self.task.modality_index(m)
            except ValueError as err:
                raise ValueError(f"audit prompt row {i + 2}: {err}") from None
        imgs = self.task.generate(list(prompts["prompt"]), list(prompts["modality"]), [int(s) for s in prompts["seed"]],
                                  batch_size=self.batch_size, **{k: self.sampling[k] for k in (
                                      "sampler", "steps", "guidance", "guidance_schedule", "min_guidance", "negative_prompt")})
        return imgs, prompts.reset_index(drop=True)

    def training_composition(self) -> dict[str, Any]:
        from medtrust.generation.quality_loop import generator_data

        dm = generator_data(self.run_dir)["datamodule"]
        dm.setup()
        return _train_composition(dm, self.attributes)


class PipelineGenerator:
    """A ``save_pretrained`` pipeline folder of a generator run."""

    kind = "pipeline"

    def __init__(self, folder: str | Path, sampling: Mapping[str, Any] | None = None, batch_size: int = 16) -> None:
        from medtrust.generation.pipeline import MedtrustLatentDiffusionPipeline, check_pipeline_folder

        self.folder = Path(str(folder)).expanduser()
        self.info = check_pipeline_folder(self.folder)
        self.pipe = MedtrustLatentDiffusionPipeline.from_pretrained(self.folder)
        s = {k: v for k, v in dict(sampling or {}).items() if v is not None}
        self.kwargs = {"num_inference_steps": int(s.get("steps", 50)), "guidance_scale": float(s.get("guidance", 3.0)),
                       "sampler": str(s.get("sampler", "ddim"))}
        self.batch_size = int(batch_size)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "folder": str(self.folder), "sampling": self.kwargs}

    def check_attributes(self, attributes: list[str]) -> None:
        pass

    def generate(self, prompts: pd.DataFrame) -> tuple[torch.Tensor, pd.DataFrame]:
        out = []
        for i in range(0, len(prompts), self.batch_size):
            part = prompts.iloc[i:i + self.batch_size]
            try:
                res = self.pipe(list(part["prompt"]), list(part["modality"]), seed=[int(s) for s in part["seed"]],
                                output_type="pt", **self.kwargs)
            except ValueError as err:
                raise ValueError(f"audit.generator.folder={self.folder}: {err}") from None
            out.append(res.images)
        return torch.cat(out), prompts.reset_index(drop=True)

    def training_composition(self) -> dict[str, Any]:
        return {"status": "unknown", "why": "a pipeline folder does not record its training data"}
