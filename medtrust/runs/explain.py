"""What ``explain.py`` does: explanations of a trained run, saved per method and image, with a
comparison grid and localisation metrics against the ground-truth masks."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import default_collate

from medtrust.metrics.localisation import pointing_game, relevance_mass
from medtrust.report import figures
from medtrust.report.html import build_run_report
from medtrust.runs.evaluate import data_config_for, rebuild_task
from medtrust.runs.rundir import check_run_dir, claim_run_dir, find_checkpoint
from medtrust.runs.train import setup_runtime
from medtrust.utils.io import write_json
from medtrust.utils.logging import get_logger
from medtrust.xai.attribution import integrated_gradients, make_baseline, saliency
from medtrust.xai.cam import attention_unet_layers, get_module, layer_gradcam
from medtrust.xai.superpixels import slic_confidence
from medtrust.xai.targets import predicted_region, segmentation_target

log = get_logger(__name__)
METHODS = ("saliency_logits", "saliency_sigmoid", "integrated_gradients", "gradcam", "slic_confidence")


def _gradcam_layers(task: torch.nn.Module, spec: Any) -> dict[str, list[str]]:
    if spec in (None, "auto"):
        return attention_unet_layers(task)
    layers = list(spec)
    for layer in layers:
        get_module(task, layer)  # raises listing the available paths
    return {"selected": layers}


def explain_segmentation(task: torch.nn.Module, dm: Any, split: str, n_images: int, xcfg: DictConfig,
                         out_dir: Path) -> dict[str, Any]:
    """Compute the configured methods on the first ``n_images`` of ``split`` and write them."""
    unknown = [m for m in xcfg.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"xai.methods: {unknown} do not apply to a segmentation task; choose from {METHODS}")
    ds = dm.dataset(split)
    n = min(int(n_images), len(ds))
    batch = default_collate([ds[i] for i in range(n)])
    images, masks = batch["image"], batch.get("mask")
    ids = [dm.load_split(split)[2][i]["id"] for i in range(n)]
    region = masks if (xcfg.region == "mask" and masks is not None) else predicted_region(task, images)
    with torch.no_grad():
        prob = torch.sigmoid(task(images))[:, 0].numpy()
    maps: dict[str, np.ndarray] = {}
    if "saliency_logits" in xcfg.methods:
        maps["saliency_logits"] = saliency(segmentation_target(task, region, use_sigmoid=False), images).numpy()
    if "saliency_sigmoid" in xcfg.methods:
        maps["saliency_sigmoid"] = saliency(segmentation_target(task, region, use_sigmoid=True), images).numpy()
    if "integrated_gradients" in xcfg.methods:
        norm = dm.normalize
        black = (-torch.tensor(norm["mean"]) / torch.tensor(norm["std"])).view(-1, 1, 1) if norm else None
        base = make_baseline(images, str(xcfg.ig.baseline), black)
        maps[f"ig_{xcfg.ig.baseline}"] = integrated_gradients(
            segmentation_target(task, region, use_sigmoid=False), images, base, int(xcfg.ig.n_steps),
            xcfg.ig.internal_batch_size).numpy()
    layer_maps: dict[str, dict[str, np.ndarray]] = {}
    if "gradcam" in xcfg.methods:
        fwd = segmentation_target(task, region, use_sigmoid=False)
        for group, layers in _gradcam_layers(task, xcfg.gradcam.layers).items():
            layer_maps[group] = {layer: layer_gradcam(task, fwd, layer, images).numpy() for layer in layers}
            # the comparison grid shows the group's last layer (closest to the output)
            maps[f"gradcam_{group}"] = layer_maps[group][layers[-1]]
    if "slic_confidence" in xcfg.methods:
        maps["slic_confidence"] = np.stack([
            slic_confidence(dm.raw_image(split, i), prob[i], int(xcfg.slic.n_segments), float(xcfg.slic.compactness))[0]
            for i in range(n)])

    # Save every map (npz + png overlay), localisation metrics, and the GlassBox-style grid.
    metrics: dict[str, Any] = {}
    raw = [dm.raw_image(split, i) for i in range(n)]
    gts = masks[:, 0].numpy() if masks is not None else None
    for name, arr in maps.items():
        folder = out_dir / "explanations" / name
        folder.mkdir(parents=True, exist_ok=True)
        pg, rm = [], []
        for i in range(n):
            np.savez_compressed(folder / f"{ids[i]}.npz", map=arr[i].astype(np.float32))
            if gts is not None:
                pg.append(pointing_game(arr[i], gts[i]))
                rm.append(relevance_mass(arr[i], gts[i]))
        figures.plot_heatmaps(raw, {name: arr}, folder / "overlays.png", titles=ids)
        if gts is not None:
            ok = [v for v in pg if np.isfinite(v)]
            metrics[name] = {"pointing_game": float(np.mean(ok)) if ok else None,
                             "relevance_mass": float(np.nanmean(rm)) if ok else None,
                             "n": n, "n_undefined": n - len(ok)}
    for group, lm in layer_maps.items():
        figures.plot_heatmaps(raw[:1] * len(lm), {f"{group}": np.stack([v[0] for v in lm.values()])},
                              out_dir / "figures" / "gradcam_layers" / f"{group}.png",
                              titles=[k.replace("net.model.", "") for k in lm])
    pred = (prob >= task.threshold).astype(float)
    figures.plot_explanation_grid(raw, gts, pred, maps, out_dir / "figures" / "explanations" / "grid.png", ids)
    result = {"split": split, "n_images": n, "region": str(xcfg.region), "ig_baseline": str(xcfg.ig.baseline),
              "localisation": metrics, "gradcam_layers": {g: list(v) for g, v in layer_maps.items()}}
    write_json(out_dir / "metrics" / "explanations.json", result)
    return result


def explain(cfg: DictConfig) -> dict[str, Any]:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    setup_runtime(cfg)
    run_dir = check_run_dir(cfg.run_dir)
    claim_run_dir(out_dir, {"kind": "explanation", "run_dir": str(run_dir.resolve())})
    run_cfg = data_config_for(run_dir, cfg)
    task = rebuild_task(run_cfg, find_checkpoint(run_dir, str(cfg.checkpoint)))
    if getattr(task, "task_name", "") != "segmentation":
        raise ValueError(f"explain.py: xai={HydraConfig.get().runtime.choices.get('xai')} applies to segmentation "
                         f"runs; {run_dir} holds a {getattr(task, 'task_name', type(task).__name__)} run")
    dm = instantiate(run_cfg.data)
    res = explain_segmentation(task, dm, str(cfg.split), int(cfg.n_images), cfg.xai, out_dir)
    build_run_report(out_dir, title=f"medtrust explanations of {run_dir.name}")
    log.info(f"explanations written to {out_dir}: " + ", ".join(
        f"{k} PG {v['pointing_game']}" for k, v in res["localisation"].items()))
    return res
