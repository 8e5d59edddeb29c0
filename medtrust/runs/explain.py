"""What ``explain.py`` does: explanations of a trained run (any task), saved per method and image,
a comparison grid, and ``metrics/explanations.json`` with localisation, stability, faithfulness,
the randomisation sanity check and stability against uncertainty / correctness."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from medtrust.metrics.faithfulness import deletion_insertion
from medtrust.metrics.stability import stability_vs_uncertainty
from medtrust.report import figures
from medtrust.report.html import build_run_report
from medtrust.runs.builders import data_config_for, rebuild_task, setup_runtime, task_class
from medtrust.runs.resolvers import progress_bar_enabled
from medtrust.runs.rundir import allow_targets, check_run_dir, claim_run_dir, find_checkpoint
from medtrust.utils.io import write_json
from medtrust.utils.logging import get_logger
from medtrust.utils.names import safe_filename
from medtrust.xai.methods import ExplainInputs, ExplanationMethod, GradCAM, run_methods
from medtrust.xai.perturb import perturbed_maps, stability_table
from medtrust.xai.pipeline import (build_methods, gather, localisation_table, reference_images, save_explanation_grid,
                                   summarise)
from medtrust.xai.sanity import compare_to_randomised, randomised_copy
from medtrust.xai.targets import Target, as_probability

log = get_logger(__name__)


def _summary_table(per: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, Any]]:
    return {name: {m: summarise(v) for m, v in metrics.items()} for name, metrics in per.items()}


def _sanity(methods: dict[str, ExplanationMethod], x: ExplainInputs, maps: dict[str, torch.Tensor],
            scfg: Any) -> dict[str, Any]:
    """Model-parameter randomisation (Adebayo et al., 2018) of every gradient method: its maps on a
    copy of the model with every parameter re-initialised, compared with the maps of the trained
    model by :func:`medtrust.xai.sanity.compare_to_randomised` (the core of ``randomisation_check``)."""
    grad = {k: m for k, m in methods.items() if m.gradient}
    if not grad:
        return {}
    rand = randomised_copy(x.task, int(scfg.get("seed", 0))).eval()
    rmaps = run_methods(grad, x.on(rand))
    thr = float(scfg.get("threshold", 0.5))
    return {name: compare_to_randomised(maps[name], r, thr) for name, r in rmaps.items()}


def explain_run(task: torch.nn.Module, dm: Any, split: str, n_images: int, xcfg: DictConfig, out_dir: Path,
                seed: int = 0, evaluation: Any = None, indices: list[int] | None = None) -> dict[str, Any]:
    """Compute the configured methods and metrics on the first ``n_images`` of ``split`` (or on ``indices``)
    and write ``explanations/<map>/<id>.{npz,png}``, the comparison grid and ``metrics/explanations.json``."""
    methods = build_methods(xcfg.methods)
    for m in methods.values():
        m.check(task)
    if indices is not None:
        return _explain(task, dm, split, list(indices), xcfg, out_dir, seed, evaluation, methods)
    indices = list(range(len(dm.dataset(split))))
    want = xcfg.get("select_label")
    if want is not None:  # e.g. only the injected images of a real-vs-synthetic set: the ones with an artifact mask
        recs = dm.load_split(split)[2]
        indices = [i for i in indices if recs[i].get("label") is not None and int(recs[i]["label"]) == int(want)]
        if not indices:
            raise ValueError(f"xai.select_label={want}: no image of split {split!r} has that label")
    return _explain(task, dm, split, indices[:int(n_images)], xcfg, out_dir, seed, evaluation, methods)


def _explain(task: torch.nn.Module, dm: Any, split: str, indices: list[int], xcfg: DictConfig, out_dir: Path,
             seed: int, evaluation: Any, methods: dict[str, ExplanationMethod]) -> dict[str, Any]:
    ref_cfg = xcfg.get("reference")
    reference, ref_info = reference_images(dm, OmegaConf.to_container(ref_cfg) if ref_cfg is not None else None)
    x, masks, labels, ids = gather(task, dm, split, indices, OmegaConf.to_container(xcfg.target), seed,
                                   evaluation, reference)
    n = len(ids)
    seconds: dict[str, float] = {}
    by_method = {}
    for name, m in tqdm(methods.items(), desc="explanations", unit="method", disable=not progress_bar_enabled()):
        t0 = time.perf_counter()
        by_method[name] = run_methods({name: m}, x)
        seconds[name] = round(time.perf_counter() - t0, 2)
    maps = {kk: v for ms in by_method.values() for kk, v in ms.items()}
    k = float(xcfg.get("topk", 0.1))

    # every map: npz + per-image overlay PNG + one strip per method
    for name, arr in maps.items():
        folder = out_dir / "explanations" / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            name_i = safe_filename(ids[i])
            np.savez_compressed(folder / f"{name_i}.npz", map=arr[i].numpy().astype(np.float32), id=ids[i])
            figures.overlay_png(x.raw[i], arr[i].numpy(), folder / f"{name_i}.png")
        figures.plot_heatmaps(x.raw, {name: arr.numpy()}, folder / "overlays.png", titles=ids)
    for m in methods.values():
        if isinstance(m, GradCAM):
            for group, lm in m.layer_maps.items():
                if len(lm) > 1:
                    figures.plot_heatmaps(x.raw[:1] * len(lm), {group: np.stack([v[0].numpy() for v in lm.values()])},
                                          out_dir / "figures" / "gradcam_layers" / f"{group}.png",
                                          titles=[p.replace("net.model.", "") for p in lm])

    result: dict[str, Any] = {"split": split, "n_images": n, "target": OmegaConf.to_container(xcfg.target),
                              "maps": list(maps), "topk": k, **({"reference": ref_info} if ref_info else {})}
    result["localisation"] = _summary_table(localisation_table(maps, masks, k))

    # stability under perturbation, per method
    stab_methods = [s for s in (xcfg.get("stability_methods") or []) if s in methods]
    per_image_stab: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    if xcfg.get("stability"):
        for s in stab_methods:
            ref = by_method[s]
            t0 = time.perf_counter()
            pert = perturbed_maps(methods[s], x, OmegaConf.to_container(xcfg.stability))
            result.setdefault("stability_undefined", {}).update(pert.undefined)  # e.g. MC dropout with p = 0
            per_image_stab.update(stability_table(ref, pert, k))
            seconds[f"stability/{s}"] = round(time.perf_counter() - t0, 2)
    result["stability"] = {name: {p: {m: summarise(v) for m, v in met.items()} for p, met in by.items()}
                           for name, by in per_image_stab.items()}

    # faithfulness: deletion / insertion of the probability target, baseline = 0 (the normalised mean)
    fcfg = xcfg.get("faithfulness")
    if fcfg:
        fwd = x.target.with_kind(as_probability(x.target.kind, task))
        result["faithfulness"] = {}
        for name, arr in maps.items():
            dels, ins = [], []
            for i in range(n):  # one image at a time: its fixed class/region scores all its perturbations
                fi = Target(task, fwd.kind, None if fwd.fixed is None else fwd.fixed[i:i + 1])
                di = deletion_insertion(fi, x.images[i:i + 1], arr[i:i + 1], n_steps=int(fcfg.get("n_steps", 20)))
                dels.append(float(di["deletion_auc"][0]))
                ins.append(float(di["insertion_auc"][0]))
            result["faithfulness"][name] = {"deletion_auc": summarise(np.array(dels)),
                                            "insertion_auc": summarise(np.array(ins))}
    if xcfg.get("sanity"):
        t0 = time.perf_counter()
        result["sanity"] = _sanity(methods, x, maps, xcfg.sanity)
        seconds["sanity"] = round(time.perf_counter() - t0, 2)

    # stability vs uncertainty and correctness (per run), as the task defines them
    outcome = task.explain_outcome(x.images, x.target.fixed, masks, labels, evaluation)
    if outcome is not None and per_image_stab:
        result["stability_vs_uncertainty"] = {}
        for name, by in per_image_stab.items():
            for p, met in by.items():
                key = f"{name}/{p}_spearman"
                result["stability_vs_uncertainty"][key] = stability_vs_uncertainty(
                    met["spearman"], outcome["uncertainty"], outcome["correct"])

    save_explanation_grid(task, x, masks, labels, maps, ids, out_dir / "figures" / "explanations" / "grid.png")
    result["seconds"] = seconds
    write_json(out_dir / "metrics" / "explanations.json", result)
    return result


def explain(cfg: DictConfig) -> dict[str, Any]:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    setup_runtime(cfg)
    allow_targets((cfg.get("security") or {}).get("allow_targets"))
    run_dir = check_run_dir(cfg.run_dir)
    cls = task_class(run_dir)
    claim_run_dir(out_dir, {"kind": "explanation", "run_dir": str(run_dir.resolve()), "task_name": cls.task_name})
    run_cfg = data_config_for(run_dir, cfg)
    task = rebuild_task(run_cfg, find_checkpoint(run_dir, str(cfg.checkpoint)))
    dm = instantiate(run_cfg.data)
    indices = None
    if cfg.get("batch"):  # GlassBox's batches: A average, B best, C worst Dice of the split
        if not cls.has_pixel_probabilities:
            raise ValueError(f"batch={cfg.batch}: GlassBox batches rank images by Dice; {cls.task_name} runs have none "
                             "(segmenter runs do)")
        from medtrust.evaluation.segmentation import batch_indices

        indices = batch_indices(task, dm, str(cfg.split), str(cfg.batch), int(cfg.n_images))
        log.info(f"batch {cfg.batch}: images {indices} of {cfg.split}")
    res = explain_run(task, dm, str(cfg.split), int(cfg.n_images), cfg.xai, out_dir, int(cfg.seed),
                      run_cfg.get("evaluation"), indices)
    dm.write_skipped(out_dir / "splits")
    if cfg.get("batch"):  # which GlassBox batch these images are, in the written result too
        res["batch"] = {"name": str(cfg.batch).lower(), "indices": indices,
                        "rule": "a: closest to the split's mean Dice, b: best Dice, c: worst Dice (model threshold)"}
        write_json(out_dir / "metrics" / "explanations.json", res)
    build_run_report(out_dir, task=cls, title=f"medtrust explanations of {run_dir.name}")
    loc = res.get("localisation", {})
    log.info(f"explanations written to {out_dir}: " + ", ".join(
        f"{k} PG {v['pointing_game']['mean']}" for k, v in loc.items()))
    return res
