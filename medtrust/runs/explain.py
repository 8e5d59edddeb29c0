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

from medtrust.metrics.classification import predictive_uncertainty
from medtrust.metrics.faithfulness import deletion_insertion
from medtrust.metrics.stability import stability_vs_uncertainty
from medtrust.report import figures
from medtrust.report.html import build_run_report
from medtrust.runs.evaluate import data_config_for, rebuild_task
from medtrust.runs.resolvers import progress_bar_enabled
from medtrust.runs.rundir import check_run_dir, claim_run_dir, find_checkpoint
from medtrust.runs.train import setup_runtime
from medtrust.utils.io import write_json
from medtrust.utils.logging import get_logger
from medtrust.xai.methods import ExplainInputs, ExplanationMethod, GradCAM, run_methods
from medtrust.xai.perturb import perturbed_maps, stability_table
from medtrust.xai.pipeline import build_methods, gather, localisation_table, save_explanation_grid, summarise
from medtrust.xai.sanity import map_similarity, randomised_copy
from medtrust.xai.targets import Target, as_probability

log = get_logger(__name__)


def _summary_table(per: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, Any]]:
    return {name: {m: summarise(v) for m, v in metrics.items()} for name, metrics in per.items()}


def _outcome(task: torch.nn.Module, x: ExplainInputs, masks: torch.Tensor | None, labels: torch.Tensor | None,
             evaluation: Any) -> dict[str, np.ndarray] | None:
    """Per-image predictive uncertainty and correctness (for stability vs uncertainty).

    Classification: predictive entropy of the MC-dropout (or ensemble) distribution, correct =
    predicted class equals the label. Segmentation: mean pixel entropy inside the predicted region,
    correct = per-image Dice >= ``evaluation.xai_dice_correct`` (default 0.8)."""
    with torch.no_grad():
        if getattr(task, "task_name", "") == "classification":
            if labels is None:
                return None
            out = task.predict_step({"image": x.images})
            logits = out.get("mc_logits", out["member_logits"])
            unc = predictive_uncertainty(torch.softmax(logits.double(), -1))
            pred = unc["mean"].argmax(-1).cpu()
            return {"uncertainty": unc["entropy"].float().cpu().numpy(), "correct": (pred == labels).numpy(),
                    "prob": unc["mean"][:, -1].float().cpu().numpy(), "pred": pred.numpy()}
        if masks is None:
            return None
        p = torch.sigmoid(x.task(x.images)).clamp(1e-6, 1 - 1e-6)
        ent = -(p * p.log() + (1 - p) * (1 - p).log())
        pred = (p >= getattr(task, "threshold", 0.5)).float()
        region = x.target.fixed if x.target.fixed is not None else pred
        unc = (ent * region).flatten(1).sum(1) / region.flatten(1).sum(1).clamp_min(1)
        inter = (pred * masks).flatten(1).sum(1)
        dice = (2 * inter + 1e-6) / (pred.flatten(1).sum(1) + masks.flatten(1).sum(1) + 1e-6)
        thr = float((evaluation or {}).get("xai_dice_correct", 0.8))
        return {"uncertainty": unc.cpu().numpy(), "correct": (dice >= thr).cpu().numpy(), "dice": dice.cpu().numpy()}


def _sanity(methods: dict[str, ExplanationMethod], x: ExplainInputs, maps: dict[str, torch.Tensor],
            scfg: Any) -> dict[str, Any]:
    """Model-parameter randomisation (Adebayo et al., 2018): the same method on a copy of the model
    with every parameter re-initialised; a method passes when its maps change a lot (mean Spearman
    of |maps| below the threshold)."""
    grad = {k: m for k, m in methods.items() if m.gradient}
    if not grad:
        return {}
    rand = randomised_copy(x.task, int(scfg.get("seed", 0))).eval()
    rmaps = run_methods(grad, x.on(rand))
    thr = float(scfg.get("threshold", 0.5))
    out = {}
    for name, r in rmaps.items():
        sims = [map_similarity(maps[name][i].numpy(), r[i].numpy()) for i in range(r.shape[0])]
        sp = summarise(np.array([s["spearman_abs"] for s in sims]))
        ss = summarise(np.array([s["ssim"] for s in sims]))
        out[name] = {"spearman_abs": sp, "ssim": ss, "threshold": thr,
                     "passes": bool(sp["mean"] is not None and sp["mean"] < thr)}
    return out


def explain_run(task: torch.nn.Module, dm: Any, split: str, n_images: int, xcfg: DictConfig, out_dir: Path,
                seed: int = 0, evaluation: Any = None) -> dict[str, Any]:
    """Compute the configured methods and metrics on the first ``n_images`` of ``split`` and write
    ``explanations/<map>/<id>.{npz,png}``, the comparison grid and ``metrics/explanations.json``."""
    methods = build_methods(xcfg.methods)
    for m in methods.values():
        m.check(task)
    n = min(int(n_images), len(dm.dataset(split)))
    x, masks, labels, ids = gather(task, dm, split, list(range(n)), OmegaConf.to_container(xcfg.target), seed)
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
            np.savez_compressed(folder / f"{ids[i]}.npz", map=arr[i].numpy().astype(np.float32))
            figures.overlay_png(x.raw[i], arr[i].numpy(), folder / f"{ids[i]}.png")
        figures.plot_heatmaps(x.raw, {name: arr.numpy()}, folder / "overlays.png", titles=ids)
    for m in methods.values():
        if isinstance(m, GradCAM):
            for group, lm in m.layer_maps.items():
                if len(lm) > 1:
                    figures.plot_heatmaps(x.raw[:1] * len(lm), {group: np.stack([v[0].numpy() for v in lm.values()])},
                                          out_dir / "figures" / "gradcam_layers" / f"{group}.png",
                                          titles=[p.replace("net.model.", "") for p in lm])

    result: dict[str, Any] = {"split": split, "n_images": n, "target": OmegaConf.to_container(xcfg.target),
                              "maps": list(maps), "topk": k}
    result["localisation"] = _summary_table(localisation_table(maps, masks, k))

    # stability under perturbation, per method
    stab_methods = [s for s in (xcfg.get("stability_methods") or []) if s in methods]
    per_image_stab: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    if xcfg.get("stability"):
        for s in stab_methods:
            ref = by_method[s]
            t0 = time.perf_counter()
            pert = perturbed_maps(methods[s], x, OmegaConf.to_container(xcfg.stability))
            per_image_stab.update(stability_table(ref, pert, k))
            seconds[f"stability/{s}"] = round(time.perf_counter() - t0, 2)
    result["stability"] = {name: {p: {m: summarise(v) for m, v in met.items()} for p, met in by.items()}
                           for name, by in per_image_stab.items()}

    # faithfulness: deletion / insertion of the probability target, baseline = 0 (the normalised mean)
    fcfg = xcfg.get("faithfulness")
    if fcfg:
        fwd = x.target.with_kind(as_probability(x.target.kind))
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

    # stability vs uncertainty and correctness (per run)
    outcome = _outcome(task, x, masks, labels, evaluation)
    if outcome is not None and per_image_stab:
        result["stability_vs_uncertainty"] = {}
        for name, by in per_image_stab.items():
            for p, met in by.items():
                key = f"{name}/{p}_spearman"
                result["stability_vs_uncertainty"][key] = stability_vs_uncertainty(
                    met["spearman"], outcome["uncertainty"], outcome["correct"])

    save_explanation_grid(task, x, masks, labels, maps, ids, out_dir / "figures" / "explanations" / "grid.png",
                          outcome.get("prob") if outcome else None)
    result["seconds"] = seconds
    write_json(out_dir / "metrics" / "explanations.json", result)
    return result


def explain(cfg: DictConfig) -> dict[str, Any]:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    setup_runtime(cfg)
    run_dir = check_run_dir(cfg.run_dir)
    claim_run_dir(out_dir, {"kind": "explanation", "run_dir": str(run_dir.resolve())})
    run_cfg = data_config_for(run_dir, cfg)
    task = rebuild_task(run_cfg, find_checkpoint(run_dir, str(cfg.checkpoint)))
    dm = instantiate(run_cfg.data)
    res = explain_run(task, dm, str(cfg.split), int(cfg.n_images), cfg.xai, out_dir, int(cfg.seed),
                      run_cfg.get("evaluation"))
    build_run_report(out_dir, title=f"medtrust explanations of {run_dir.name}")
    loc = res.get("localisation", {})
    log.info(f"explanations written to {out_dir}: " + ", ".join(
        f"{k} PG {v['pointing_game']['mean']}" for k, v in loc.items()))
    return res
