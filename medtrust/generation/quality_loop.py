"""MINIM's quality loop end to end (``python train.py experiment=minim_quality``): a generator, a
selector trained on ratings of its samples, rating-driven fine-tuning, and the measurement of what it
changed.

Every stage is an ordinary command of this project, run in its own sub-folder of the loop's run folder
and written to ``commands.txt``, so each can be re-run or replaced by hand (with real ratings, say):

1. ``base_vae/``, ``base/``: the generator (``train.py``), unless ``generator_run`` is given.
2. ``prompts/``: prompts from the generator's data: ``rated.csv`` and ``policy.csv`` from disjoint
   training records, ``eval.csv`` from the evaluation split (held out from every fitting step).
3. ``pool_rated/``: one sample per rated prompt (``generate.py``); ``ratings/ratings.csv``: the ratings
   (``path,rating,rater``) of simulated raters who see the known quality with noise
   (:mod:`medtrust.data.phantoms.quality`), or a user's ``ratings`` CSV of real raters instead.
4. ``selector/``: the selector, a classifier run on the ratings (``train.py experiment=minim_selector``);
   its accuracy against the *known* quality is measured on its test images (rated images it neither
   trained on, was selected on, nor was calibrated on).
5. ``pool_policy/``: samples of the policy prompts scored by the selector (``generate.py selector.run=``).
6. ``finetune/``: LoRA fine-tuned on them with reward weights (``train.py experiment=minim_rlhf``).
7. Before and after, in process: the evaluation prompts sampled by the base and by the fine-tuned
   generator with the same seeds; every image rated by the known quality function (phantoms), scored
   by the selector, judged by the base run's judge (modality and finding); MS-SSIM between the samples
   of a prompt. Paired changes with prompt-cluster CIs (:mod:`medtrust.metrics.selection`), and what the
   selector's filter keeps, per modality and per subgroup.

Written: ``metrics/quality_loop.json`` (``selector_accuracy``, ``top_rated_share.{before,after,diff,
diff_ci}``, ...), ``metrics/quality_loop_images.csv``, figures and ``report/index.html``.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from medtrust.metrics.selection import kept_composition, paired_share_change, wilson
from medtrust.utils.io import atomic_write_bytes, read_json, write_csv, write_json
from medtrust.utils.logging import get_logger

log = get_logger(__name__)

ROOT = Path(__file__).resolve().parents[2]
PROMPT_ATTRIBUTES = ("sex", "age_group", "finding")


class StageError(RuntimeError):
    """A stage's command failed (the message names the stage, its command and its log)."""


def _plain(x: Any) -> Any:
    return OmegaConf.to_container(x, resolve=True) if isinstance(x, DictConfig) or OmegaConf.is_list(x) else x


class QualityLoop:
    """The loop's settings (``pipeline`` of ``conf/experiment/minim_quality.yaml``).

    Args:
        generator_run: a trained generator run; None trains one (``base_vae`` then ``base`` overrides).
        selector_run: a trained selector run (skips rating and selector training).
        finetune_run: a fine-tuned run of ``generator_run`` (skips fine-tuning; only measures).
        policy_pool: a scored sample folder of ``generator_run`` (``generate.py selector.run=...``) to fine-tune on
            (skips sampling it).
        ratings, rated_images: a ratings CSV of real raters and the folder of its images (skips the
            simulated raters; the rated images must be samples of the generator).
        rater: the known quality function (a partial of
            :class:`~medtrust.data.phantoms.quality.PhantomQualityRater`), None on real data.
        raters: the simulated raters (``sigma``, ``bias`` of each).
        base_vae, base, selector, finetune: extra overrides of each stage's ``train.py`` command.
        common: overrides of every ``train.py`` stage (e.g. ``threads=1``).
        prompts: ``{rated, policy, policy_per_prompt, seed}``: how many training prompts are rated
            (the rest, up to ``policy``, are the fine-tuning prompts) and samples per policy prompt.
        sampling: overrides of the generator's sampling for every image of the loop (e.g. ``{steps: 25}``).
        evaluation: ``{split, prompts, samples_per_prompt, seed, bootstrap, permutations, keep_min_score,
            score, batch_size, min_group_size, n_show}``.
        batch_size: generation batch size.
    """

    def __init__(self, generator_run: str | None = None, selector_run: str | None = None,
                 finetune_run: str | None = None, policy_pool: str | None = None, ratings: str | None = None,
                 rated_images: str | None = None,
                 rater: Any = None, raters: Sequence[Mapping[str, float]] = (), base_vae: Sequence[str] = (),
                 base: Sequence[str] = (), selector: Sequence[str] = (), finetune: Sequence[str] = (),
                 common: Sequence[str] = (), prompts: Mapping[str, Any] | None = None,
                 sampling: Mapping[str, Any] | None = None, evaluation: Mapping[str, Any] | None = None,
                 batch_size: int = 32) -> None:
        self.generator_run, self.selector_run, self.finetune_run = generator_run, selector_run, finetune_run
        self.policy_pool = policy_pool
        if bool(ratings) != bool(rated_images):
            raise ValueError("pipeline.ratings and pipeline.rated_images go together: a ratings CSV of real raters and "
                             "the folder (a generate.py output of the generator) its paths point into")
        if not ratings and rater is None and not selector_run:
            raise ValueError("pipeline.rater is null and no pipeline.ratings CSV is given: the loop needs ratings "
                             "(a known quality function on phantoms, or the CSV of real raters)")
        self.ratings, self.rated_images, self.rater_factory = ratings, rated_images, rater
        self.raters = [dict(r) for r in (raters or ())]
        self.overrides = {"base_vae": list(base_vae), "base": list(base), "selector": list(selector),
                          "finetune": list(finetune)}
        self.common = list(common)
        self.prompt_cfg = {"rated": 600, "policy": None, "policy_per_prompt": 2, "seed": 0, **dict(prompts or {})}
        self.sampling = dict(sampling or {})
        self.eval_cfg = {"split": "test", "prompts": None, "samples_per_prompt": 2, "seed": 100000, "bootstrap": 2000,
                         "permutations": 9999, "keep_min_score": 2.5, "score": "expected", "min_group_size": 10,
                         "n_show": 8, **dict(evaluation or {})}
        self.batch_size = int(batch_size)
        self.commands: list[dict[str, Any]] = []

    # -- stages as commands ------------------------------------------------------------------------
    def _run(self, name: str, script: str, args: Sequence[str], out: Path) -> Path:
        """Run ``python <script> args`` (a stage); its output goes to ``logs/<name>.log``."""
        cmd = [sys.executable, str(ROOT / script), *[str(a) for a in args]]
        logs = self.run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_file = logs / f"{name}.log"
        t0 = time.perf_counter()
        log.info(f"stage {name}: {' '.join(cmd[1:])}")
        env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
        with open(log_file, "w") as fh:
            proc = subprocess.run(cmd, cwd=str(ROOT), stdout=fh, stderr=subprocess.STDOUT, env=env)
        seconds = round(time.perf_counter() - t0, 1)
        self.commands.append({"stage": name, "command": " ".join(["python", script, *map(str, args)]),
                              "seconds": seconds, "returncode": proc.returncode, "log": str(log_file)})
        self._write_commands()
        if proc.returncode != 0:
            tail = "".join(log_file.read_text(errors="replace").splitlines(keepends=True)[-15:])
            raise StageError(f"stage {name} failed (exit {proc.returncode}); command: {' '.join(cmd[1:])}; log "
                             f"{log_file}:\n{tail}")
        return out

    def _write_commands(self) -> None:
        lines = [f"# {c['stage']} ({c['seconds']} s, exit {c['returncode']})\n{c['command']}\n" for c in self.commands]
        atomic_write_bytes(self.run_dir / "commands.txt", "".join(lines).encode())

    def _train(self, name: str, args: Sequence[str]) -> Path:
        out = self.run_dir / name
        return self._run(name, "train.py", [*args, *self.common, f"hydra.run.dir={out}"], out)

    def _generate(self, name: str, generator: Path, prompts: Path, n: int, seed: int,
                  extra: Sequence[str] = ()) -> Path:
        out = self.run_dir / name
        args = [f"run_dir={generator}", f"prompts={prompts}", f"n={n}", f"seed={seed}", f"out_dir={out}",
                f"batch_size={self.batch_size}", *[f"++sampling.{k}={v}" for k, v in self.sampling.items()], *extra]
        return self._run(name, "generate.py", args, out)

    # -- the loop ----------------------------------------------------------------------------------
    def execute(self, run_dir: Path) -> dict[str, Any]:
        """Run the loop in ``run_dir`` and write ``metrics/quality_loop.json`` and the report."""
        from medtrust.report.html import build_run_report

        result = self.run(run_dir)
        write_json(Path(run_dir) / "metrics" / "quality_loop.json", result)
        build_run_report(run_dir, task=QualityLoopReport,
                         title="medtrust quality loop (MINIM selector + rating-driven fine-tuning)")
        return result

    def run(self, run_dir: Path) -> dict[str, Any]:
        self.run_dir = Path(run_dir)
        t0 = time.perf_counter()
        gen = Path(self.generator_run) if self.generator_run else self.train_base()
        data = generator_data(gen)
        prompts = self.write_prompts(data, self.run_dir / "prompts")
        rated_dir, truth = None, None
        if self.selector_run:
            selector = Path(self.selector_run)
            truth = self.selector_truth(selector, data)
        else:
            if self.ratings:
                ratings, rated_dir = Path(self.ratings), Path(self.rated_images)
            else:
                rated_dir = self._generate("pool_rated", gen, prompts["rated"], 1, int(self.prompt_cfg["seed"]))
                ratings, truth = self.simulate_ratings(rated_dir, data)
            selector = self._train("selector", ["experiment=minim_selector", f"data.manifest={ratings}",
                                                f"data.root={rated_dir}", f"data.image_size={list(data['image_size'])}",
                                                *self.overrides["selector"]])
        if self.finetune_run:
            tuned = Path(self.finetune_run)
        else:
            pool = Path(self.policy_pool) if self.policy_pool else self._generate(
                "pool_policy", gen, prompts["policy"], int(self.prompt_cfg["policy_per_prompt"]),
                int(self.prompt_cfg["seed"]) + 10**6, [f"selector.run={selector}", f"selector.score={self.eval_cfg['score']}"])
            tuned = self._train("finetune", ["experiment=minim_rlhf", *data["overrides"], f"generator_run={gen}",
                                             f"data.train_source.folder={pool}", *self.overrides["finetune"]])
        result = self.measure(gen, selector, tuned, data, prompts["eval"], truth)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        result["commands"] = self.commands
        return result

    def train_base(self) -> Path:
        vae = self._train("base_vae", ["experiment=minim_vae", *self.overrides["base_vae"]])
        return self._train("base", ["experiment=minim", f"model.vae_run={vae}", *self.overrides["base"]])

    # -- prompts and ratings -----------------------------------------------------------------------
    def write_prompts(self, data: Mapping[str, Any], folder: Path) -> dict[str, Path]:
        """``rated.csv`` / ``policy.csv`` (disjoint training records) and ``eval.csv`` (the evaluation split)."""
        dm = data["datamodule"]
        train = prompt_table(dm, "train", data["modalities"])
        rng = np.random.default_rng(int(self.prompt_cfg["seed"]))
        order = rng.permutation(len(train))
        n_rated = min(int(self.prompt_cfg["rated"]), len(train) - 1)
        rated, policy = train.iloc[np.sort(order[:n_rated])], train.iloc[np.sort(order[n_rated:])]
        if self.prompt_cfg.get("policy"):
            policy = policy.iloc[:int(self.prompt_cfg["policy"])]
        ev = prompt_table(dm, str(self.eval_cfg["split"]), data["modalities"])
        if self.eval_cfg.get("prompts"):
            ev = ev.iloc[np.sort(np.random.default_rng(int(self.eval_cfg["seed"])).permutation(len(ev))
                                 [:int(self.eval_cfg["prompts"])])]
        out = {}
        for name, df in (("rated", rated), ("policy", policy), ("eval", ev)):
            if df.empty:
                raise ValueError(f"quality loop: no {name} prompts (the generator's data has too few records)")
            out[name] = write_csv(folder / f"{name}.csv", df.reset_index(drop=True))
        return out

    def simulate_ratings(self, rated_dir: Path, data: Mapping[str, Any]) -> tuple[Path, pd.DataFrame]:
        """Ratings of the rated pool by the simulated raters (``ratings/ratings.csv``) and the known
        quality of every rated image (``ratings/truth.csv``)."""
        from medtrust.data.phantoms.quality import DEFAULT_RATERS, simulate_raters
        from medtrust.data.sources.generated import read_generated

        table = read_generated(rated_dir)
        images = load_images(table["path"])
        rater = self.known_rater(data)
        contrast = rater.contrast(images, list(table["modality"]))
        truth = pd.DataFrame({"path": table["file"], "modality": table["modality"], "contrast": contrast,
                              "rating": rater.rate(images, list(table["modality"]))})
        ratings = simulate_raters(contrast, self.raters or DEFAULT_RATERS, rater.thresholds,
                                  seed=int(self.prompt_cfg["seed"]), ids=list(table["file"]))
        ratings = ratings.rename(columns={"image": "path"})[["path", "rating", "rater"]]
        folder = self.run_dir / "ratings"
        write_csv(folder / "truth.csv", truth)
        return write_csv(folder / "ratings.csv", ratings), truth

    def selector_truth(self, selector: Path, data: Mapping[str, Any]) -> pd.DataFrame | None:
        """The known quality of the images a given selector run was trained and tested on (its
        ``data.root``, a generate.py folder), so its accuracy against the truth is measured too."""
        from medtrust.data.sources.generated import read_generated
        from medtrust.runs.rundir import load_run_config

        rater = self.known_rater(data)
        root = load_run_config(selector).data.get("root")
        if rater is None or not root or not Path(str(root)).is_dir():
            return None
        table = read_generated(Path(str(root)))
        table = table[table["path"] != ""]
        if not set(table["modality"]) <= set(rater.modalities):
            return None
        images = load_images(table["path"])
        return pd.DataFrame({"path": table["file"], "modality": table["modality"],
                             "contrast": rater.contrast(images, list(table["modality"])),
                             "rating": rater.rate(images, list(table["modality"]))})

    def known_rater(self, data: Mapping[str, Any]) -> Any:
        if self.rater_factory is None:
            return None
        if not hasattr(self, "_rater"):
            self._rater = self.rater_factory(modalities=data["modalities"], size=int(data["image_size"][0]))
        return self._rater

    # -- measuring -----------------------------------------------------------------------------------
    def measure(self, gen: Path, selector_dir: Path, tuned: Path, data: Mapping[str, Any], eval_prompts: Path,
                truth: pd.DataFrame | None) -> dict[str, Any]:
        """Before (the base) and after (the fine-tuned run) on the evaluation prompts, same seeds."""
        from medtrust.evaluation.generation import load_evaluators
        from medtrust.generation.evaluator import predict
        from medtrust.generation.selector import Selector
        from medtrust.metrics import generation as gm
        from medtrust.runs.builders import rebuild_task
        from medtrust.runs.rundir import find_checkpoint, load_run_config

        ec = self.eval_cfg
        prompts = pd.read_csv(eval_prompts, dtype=str, keep_default_na=False)
        k = int(ec["samples_per_prompt"])
        rows = prompts.loc[prompts.index.repeat(k)].reset_index(drop=True)
        rows["sample"] = np.tile(np.arange(k), len(prompts))
        rows["prompt_id"] = np.repeat(np.arange(len(prompts)), k)
        seeds = [int(ec["seed"]) + i for i in range(len(rows))]
        rows["seed"] = seeds
        judge = load_evaluators(gen)
        selector = Selector.from_run(selector_dir)
        rater = self.known_rater(data)
        sets: dict[str, torch.Tensor] = {}
        for when, run in (("before", gen), ("after", tuned)):
            cfg = load_run_config(run)
            task = rebuild_task(cfg, find_checkpoint(run, "best"))
            settings = task.sampling_record(**self.sampling)
            t0 = time.perf_counter()
            imgs = task.generate(list(rows["prompt"]), list(rows["modality"]), seeds, batch_size=self.batch_size,
                                 **{key: settings[key] for key in ("sampler", "steps", "guidance", "guidance_schedule",
                                                                   "min_guidance", "negative_prompt")})
            log.info(f"{when}: {len(imgs)} images in {time.perf_counter() - t0:.0f} s")
            sets[when] = imgs
            score, p_top = selector.score(imgs, str(ec["score"]))
            rows[f"selector_score_{when}"] = score
            rows[f"selector_p_top_{when}"] = p_top
            rows[f"kept_{when}"] = score >= float(ec["keep_min_score"])
            if rater is not None:
                rows[f"contrast_{when}"] = rater.contrast(imgs, list(rows["modality"]))
                rows[f"rating_{when}"] = rater.rate(imgs, list(rows["modality"]))
            if judge is not None:
                pred = predict(judge["_evaluator"], imgs)
                mods = data["modalities"]
                rows[f"modality_correct_{when}"] = [mods[int(m)] == a for m, a in zip(pred["modality"], rows["modality"])]
                if "finding" in pred and "label" in rows and rows["label"].str.len().all():
                    rows[f"finding_correct_{when}"] = (pred["finding"].numpy() == rows["label"].astype(int).to_numpy())
            del task
        out = self._statistics(rows, sets, k, rater, selector, truth, selector_dir, gen, tuned, gm)
        write_csv(self.run_dir / "metrics" / "quality_loop_images.csv", rows)
        out["figures"] = [str(p) for p in self._figures(rows, sets)]
        return out

    def _statistics(self, rows: pd.DataFrame, sets: Mapping[str, torch.Tensor], k: int, rater: Any, selector: Any,
                    truth: pd.DataFrame | None, selector_dir: Path, gen: Path, tuned: Path, gm: Any) -> dict[str, Any]:
        ec = self.eval_cfg
        nb, nperm = int(ec["bootstrap"]), int(ec["permutations"])
        cl = rows["prompt_id"].to_numpy()
        top = selector.scale[1]

        def change(col: str, fn=lambda v: v) -> dict[str, Any]:
            return paired_share_change(fn(rows[f"{col}_before"].to_numpy()), fn(rows[f"{col}_after"].to_numpy()), cl,
                                       n_boot=nb, n_perm=nperm)

        out: dict[str, Any] = {
            "split": "quality_loop", "metric_groups": ["quality"], "task": "quality_loop",
            "generator_run": str(gen), "selector_run": str(selector_dir), "finetune_run": str(tuned),
            "evaluation_prompts": f"{ec['split']} split of the generator's data ({rows['prompt_id'].nunique()} prompts x "
                                  f"{k} samples, the same seeds before and after; held out from rating, selector and "
                                  "fine-tuning)",
            "sampling": self.sampling, "selector": selector_summary(selector_dir, truth, selector),
            "selector_top_share": change("selector_score", lambda v: v >= float(ec["keep_min_score"])),
            "keep_min_score": float(ec["keep_min_score"]), "score": str(ec["score"])}
        out["selector_accuracy"] = out["selector"]["accuracy_known"]
        if rater is not None:
            out["known_quality"] = rater.describe()
            out["top_rated_share"] = change("rating", lambda v: v == top)
            out["top_rated_share"]["rated_by"] = "known quality function (phantom contrast ratio)"
            out["mean_rating"] = {w: float(rows[f"rating_{w}"].mean()) for w in ("before", "after")}
            out["rating_counts"] = {w: {str(r): int((rows[f"rating_{w}"] == r).sum()) for r in range(1, top + 1)}
                                    for w in ("before", "after")}
            for when in ("before", "after"):  # the selector against the truth on the evaluation images
                kept = rows[f"kept_{when}"].to_numpy()
                is_top = rows[f"rating_{when}"].to_numpy() == top
                out.setdefault("selector_on_eval_images", {})[when] = {
                    "top_rated_share_all": float(is_top.mean()),
                    "top_rated_share_kept": float(is_top[kept].mean()) if kept.any() else None,
                    "top_rated_share_kept_ci": wilson(int(is_top[kept].sum()), int(kept.sum())),
                    "recall_of_top_rated": float(kept[is_top].mean()) if is_top.any() else None,
                    "n_kept": int(kept.sum())}
        else:
            out["top_rated_share"] = {**out["selector_top_share"], "rated_by": "the selector (no known quality: real "
                                      "data); a proxy the fine-tuning optimised, not an independent rating"}
        for col in ("modality_correct", "finding_correct"):
            if f"{col}_before" in rows:
                out[col.replace("_correct", "_accuracy")] = change(col, lambda v: v.astype(bool))
        out["diversity_ms_ssim"] = {}
        if k >= 2:
            for when, imgs in sets.items():
                groups = [imgs[i * k:(i + 1) * k] for i in range(len(imgs) // k)]
                d = gm.ms_ssim_diversity(groups, n_boot=min(nb, 1000))
                out["diversity_ms_ssim"][when] = {"ms_ssim": d.get("ms_ssim"), "ci95": d.get("ci95")}
        attrs = [c for c in ("modality", *PROMPT_ATTRIBUTES) if c in rows]
        out["filtering"] = {}
        for when in ("before", "after"):
            df = rows.assign(kept=rows[f"kept_{when}"])
            truth = None
            if f"rating_{when}" in rows:  # known quality: the keep rate splits into the images' and the filter's part
                df, truth = df.assign(top_rated=rows[f"rating_{when}"] == top), "top_rated"
            out["filtering"][when] = kept_composition(df, attrs, "kept", "prompt_id", n_boot=min(nb, 1000),
                                                      min_group_size=int(ec["min_group_size"]), truth=truth)
        out["per_modality"] = per_modality_changes(rows, top, float(ec["keep_min_score"]))
        out["fine_tuning"] = finetune_summary(tuned)
        q = out["top_rated_share"]
        out["quality"] = {k2: v for k2, v in {
            "top_rated_share_before": q.get("before"), "top_rated_share_after": q.get("after"),
            "top_rated_share_diff": q.get("diff"), "selector_accuracy": (out["selector_accuracy"] or {}).get("value"),
            "finding_accuracy_before": (out.get("finding_accuracy") or {}).get("before"),
            "finding_accuracy_after": (out.get("finding_accuracy") or {}).get("after")}.items() if v is not None}
        return out

    def _figures(self, rows: pd.DataFrame, sets: Mapping[str, torch.Tensor]) -> list[Path]:
        from medtrust.report.figures import figure_dpi, plot_image_grid

        folder = self.run_dir / "figures" / "quality_loop"
        n = int(self.eval_cfg["n_show"])
        idx = list(range(0, len(rows), max(1, len(rows) // n)))[:n]
        if "rating_before" in rows:  # show what changed: gained a rating, lost one, then a spread of the rest
            b, a = rows["rating_before"].to_numpy(), rows["rating_after"].to_numpy()
            gained, lost = list(np.flatnonzero(a > b)), list(np.flatnonzero(a < b))
            pick = gained[: (n + 1) // 2] + lost[: max(1, n // 4)]
            idx = (pick + [i for i in idx if i not in pick])[:n]
        groups = {}
        for when, imgs in sets.items():
            cap = (lambda i, w=when: f"r{rows.get(f'rating_{w}', pd.Series(['?'] * len(rows)))[i]} "
                                     f"s{rows[f'selector_score_{w}'][i]:.2f}")
            groups[when] = [(imgs[i].permute(1, 2, 0).numpy(), cap(i)) for i in idx]
        out = [plot_image_grid(groups, folder / "before_after.png",
                               "same prompts and seeds: base (before) vs rating-fine-tuned (after); r = known rating, "
                               "s = selector score (images whose rating changed first)")]
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if "rating_before" in rows:
            fig, ax = plt.subplots(figsize=(4.2, 2.8))
            for j, when in enumerate(("before", "after")):
                counts = rows[f"rating_{when}"].value_counts(normalize=True).sort_index()
                ax.bar(counts.index + (j - 0.5) * 0.35, counts.to_numpy(), width=0.35, label=when)
            ax.set_xlabel("known rating")
            ax.set_ylabel("share of images")
            ax.legend(fontsize=7)
            fig.tight_layout()
            p = folder / "ratings_before_after.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(p, dpi=figure_dpi())
            plt.close(fig)
            out.append(p)
        return out


# -- helpers ---------------------------------------------------------------------------------------
def generator_data(run_dir: Path) -> dict[str, Any]:
    """The generator run's data (its datamodule, modalities, image size) and the overrides that give a
    new run the same data (its ``data`` choice and ``data.*`` overrides) and UNet (``model.*``)."""
    from hydra.utils import instantiate

    from medtrust.runs.rundir import check_run_dir, load_run_choices, load_run_config

    run_dir = check_run_dir(run_dir, "generator_run")
    cfg = load_run_config(run_dir)
    if cfg.model.get("_target_") != "medtrust.tasks.generation.GenerationTask":
        raise ValueError(f"generator_run={run_dir}: a {cfg.model.get('_target_')} run; expected a generator "
                         "(python train.py experiment=minim ...)")
    from omegaconf import open_dict

    from medtrust.runs.resolvers import PROJECT_ROOT

    with open_dict(cfg):
        cfg.paths.root_dir = str(PROJECT_ROOT)
    dm = instantiate(cfg.data)
    choices = load_run_choices(run_dir)
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    given = [str(o) for o in OmegaConf.load(overrides_file)] if overrides_file.is_file() else []
    keep = [o for o in given if o.split("=", 1)[0].lstrip("+~").startswith(("data.", "model."))
            and not o.split("=", 1)[0].lstrip("+~").startswith(("model.vae_run", "model.init_from", "model.lora",
                                                                  "model.reward", "model.optimizer", "model.sampling"))]
    data = OmegaConf.to_container(cfg.data, resolve=True)
    return {"datamodule": dm, "modalities": list(data["modalities"]), "image_size": list(data["image_size"]),
            "overrides": [f"data={choices.get('data', 'phantom_multimodal')}", *keep], "run_dir": run_dir}


def prompt_table(dm: Any, split: str, modalities: Sequence[str]) -> pd.DataFrame:
    """The prompts of a split's records: ``prompt, modality, sex, age_group, finding, label, record``."""
    recs = dm.split_records[split]
    rows = []
    for r in recs:
        a = r.get("attrs") or {}
        rows.append({"prompt": str(r["text"]), "modality": modalities[int(r["modality"])],
                     **{c: str(a[c]) for c in PROMPT_ATTRIBUTES if c in a},
                     "label": "" if r.get("label") is None else int(r["label"]), "record": str(r["id"])})
    return pd.DataFrame(rows)


def load_images(paths: Sequence[str]) -> torch.Tensor:
    """PNG files -> N×3×H×W in [0, 1]."""
    from PIL import Image

    arrs = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255 for p in paths]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)


def selector_summary(selector_dir: Path, truth: pd.DataFrame | None, selector: Any) -> dict[str, Any]:
    """The selector run's own figures (test split: accuracy vs the raters, ECE, subgroup gaps, the raters'
    agreement) and its accuracy against the known quality on its test images."""
    m = read_json(selector_dir / "metrics" / "test.json") if (selector_dir / "metrics" / "test.json").is_file() else {}
    cls = m.get("cls") or {}
    out: dict[str, Any] = {"run_dir": str(selector_dir), **selector.describe(),
                           "accuracy_vs_raters": cls.get("accuracy"), "ece_top_label": (m.get("cal") or {}).get("ece_top_label"),
                           "n_test": m.get("n_images"), "agreement": ((m.get("data") or {}).get("ratings") or {}).get("agreement"),
                           "ratings": {k: v for k, v in ((m.get("data") or {}).get("ratings") or {}).items() if k != "agreement"},
                           "subgroup_gaps": _gaps(m.get("subgroups"))}
    out["accuracy_known"] = None
    pred_csv = selector_dir / "test_predictions.csv"
    if truth is not None and pred_csv.is_file():
        pred = pd.read_csv(pred_csv)
        t = truth.set_index("path")
        ids = [i for i in pred["id"] if i in t.index]
        if ids:
            p = pred.set_index("id").loc[ids, "pred"].to_numpy() + selector.scale[0]
            true = t.loc[ids, "rating"].to_numpy()
            k = int((p == true).sum())
            out["accuracy_known"] = {"value": k / len(ids), "ci95": wilson(k, len(ids)), "n": len(ids),
                                     "against": "the known quality rating (not the raters')",
                                     "reported_on": "the selector's test split: rated images it neither trained on, "
                                                    "was selected on, nor was calibrated on",
                                     "confusion": pd.crosstab(pd.Series(true, name="known"),
                                                              pd.Series(p, name="selector")).to_dict()}
    return out


def _gaps(subgroups: Any) -> dict[str, Any]:
    """attribute -> metric -> gap, CI and permutation p of a classifier's ``subgroups`` block; the group
    sizes with it (groups below the minimum size have no gap)."""
    out = {}
    for attr, v in ((subgroups or {}).get("attributes") or {}).items():
        out[attr] = {"n": {g: x.get("n") for g, x in (v.get("groups") or {}).items()},
                     "gaps": {name: {k: g.get(k) for k in ("gap", "ci95", "p_value", "highest", "lowest") if k in g}
                              for name, g in (v.get("gaps") or {}).items() if isinstance(g, dict)}}
    return out


def per_modality_changes(rows: pd.DataFrame, top: int, keep_min_score: float) -> dict[str, Any]:
    """Per modality, before -> after: the known rating's top share and mean, the selector's mean score and
    its keep share, and the judge's modality accuracy. Where the selector's score rises and the known
    rating does not, the fine-tuning found a blind spot of the selector (reward hacking)."""
    out = {}
    for m, g in rows.groupby("modality", sort=True):
        d: dict[str, Any] = {"n": int(len(g))}
        for when in ("before", "after"):
            v = {"selector_mean": float(g[f"selector_score_{when}"].mean()),
                 "selector_keep_share": float((g[f"selector_score_{when}"] >= keep_min_score).mean())}
            if f"rating_{when}" in g:
                v.update(known_mean=float(g[f"rating_{when}"].mean()), top_rated_share=float((g[f"rating_{when}"] == top).mean()))
            if f"modality_correct_{when}" in g:
                v["modality_accuracy"] = float(g[f"modality_correct_{when}"].astype(float).mean())
            d[when] = v
        out[str(m)] = d
    return out


def finetune_summary(run_dir: Path) -> dict[str, Any]:
    """The fine-tuned run's share of trainable parameters, its LoRA folder and its fit time."""
    info: dict[str, Any] = {"run_dir": str(run_dir)}
    lora = run_dir / "lora" / "lora.json"
    if lora.is_file():
        li = read_json(lora)
        info.update(lora_bytes=li.get("bytes"), trainable_share_of_unet=li.get("trainable_share_of_unet"),
                    rank=li.get("rank"))
    m = run_dir / "metrics" / "test.json"
    if m.is_file():
        mm = read_json(m)
        info.update(fit_seconds=mm.get("fit_seconds"), epochs=mm.get("epochs"))
    return info


class QualityLoopReport:
    """The report's view of a quality-loop folder (its trust lines and section)."""

    task_name = "quality_loop"

    @classmethod
    def trust_summary(cls, run_dir: Path, metrics: Mapping[str, Mapping[str, Any]]) -> list[Any]:
        from medtrust.report.quality import quality_trust_lines

        return quality_trust_lines(run_dir, metrics)

    @classmethod
    def report_sections(cls, run_dir: Path, metrics: Mapping[str, Mapping[str, Any]]) -> list[Any]:
        from medtrust.report.quality import quality_sections

        return quality_sections(run_dir, metrics)
