"""Shared steps of explain.py, the explanation callback and evaluate.py: build the configured
methods, gather a fixed set of images with their target, and measure maps (localisation against the
ground-truth mask, stability under perturbation). Undefined values (all-zero / NaN maps, no mask)
are counted, never averaged in."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import default_collate

from medtrust.metrics.localisation import localisation_metrics
from medtrust.xai.methods import ExplainInputs, ExplanationMethod
from medtrust.xai.targets import fix_target, make_target


def build_methods(methods_cfg: Any, only: Sequence[str] | None = None) -> dict[str, ExplanationMethod]:
    """Instantiate ``xai.methods`` (name -> ``_target_`` entry), optionally only the keys ``only``.

    Raises:
        KeyError: a name in ``only`` that is not a configured method (the configured ones are listed).
    """
    cfg = OmegaConf.to_container(methods_cfg, resolve=True) if isinstance(methods_cfg, DictConfig) else dict(methods_cfg or {})
    if only is not None:
        missing = [m for m in only if m not in cfg]
        if missing:
            raise KeyError(f"xai: method(s) {missing} are not configured under xai.methods; configured: {sorted(cfg)}")
        cfg = {k: cfg[k] for k in only}
    return {name: instantiate(c, _convert_="all") for name, c in cfg.items()}


def black_value(dm: Any) -> torch.Tensor | None:
    """C×1×1 value of a black pixel after the datamodule's normalisation (IG/SHAP black baseline)."""
    norm = getattr(dm, "normalize", None)
    if not norm:
        return None
    return (-torch.tensor(norm["mean"]) / torch.tensor(norm["std"])).view(-1, 1, 1)


REFERENCE_KEYS = ("split", "n", "label", "seed")


def reference_images(dm: Any, cfg: Mapping[str, Any] | None) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """SHAP's background set: up to ``n`` images of ``split`` (``label``: only that class, e.g. the real
    images of a real-vs-synthetic set; null: every image), a seeded subset when there are more, normalised
    as the model sees them. ``cfg`` None: none.

    Raises:
        ValueError: an unknown key, or no image left (naming the split and label).
    """
    if not cfg:
        return None, {}
    cfg = dict(cfg)
    unknown = sorted(set(cfg) - set(REFERENCE_KEYS))
    if unknown:
        raise ValueError(f"xai.reference: unknown key(s) {unknown}; expected {list(REFERENCE_KEYS)}")
    split, n, label = str(cfg.get("split", "train")), int(cfg.get("n", 1000)), cfg.get("label")
    if n < 1:
        raise ValueError(f"xai.reference.n={n}: expected >= 1")
    imgs, _, recs = dm.load_split(split)
    pool = [i for i, r in enumerate(recs) if label is None or (r.get("label") is not None and int(r["label"]) == int(label))]
    if not pool:
        raise ValueError(f"xai.reference: no image of split {split!r}" + (f" with label {label}" if label is not None else ""))
    keep = pool
    if len(pool) > n:
        keep = sorted(np.random.default_rng(int(cfg.get("seed", 0))).choice(pool, size=n, replace=False).tolist())
    x = torch.stack([imgs[i].float().div(255) for i in keep])
    norm = getattr(dm, "normalize", None)
    if norm:
        x = (x - torch.tensor(norm["mean"]).view(1, -1, 1, 1)) / torch.tensor(norm["std"]).view(1, -1, 1, 1)
    return x, {"split": split, "label": label, "n": len(keep), "n_requested": n, "n_available": len(pool)}


def gather(task: torch.nn.Module, dm: Any, split: str, indices: Sequence[int], target_spec: Mapping[str, Any],
           seed: int = 0, evaluation: Any = None,
           reference: torch.Tensor | None = None) -> tuple[ExplainInputs, torch.Tensor | None, torch.Tensor | None, list[str]]:
    """Images ``indices`` of ``split`` (un-augmented) with the target fixed on them, or as many of the
    task's own explanation images (:meth:`Task.explain_images`, e.g. injected artifacts); ``reference``:
    SHAP's background images (:func:`reference_images`).

    Returns:
        (inputs, masks B×1×H×W or None, labels B or None, image ids).
    """
    own = task.explain_images(dm, split, len(indices), seed, evaluation) if hasattr(task, "explain_images") else None
    if own is not None:  # the task's own images (e.g. injected artifacts with their masks)
        device = next(task.parameters()).device
        images = own["images"].to(device)
        fixed = fix_target(task, images, target_spec, own.get("masks"), own.get("labels"))
        x = ExplainInputs(task, images, make_target(task, str(target_spec["kind"]), fixed), black_value(dm),
                          list(own["raw"]), seed, reference)
        return x, own.get("masks"), own.get("labels"), list(own["ids"])
    ds = dm.dataset(split)
    batch = default_collate([ds[i] for i in indices])
    device = next(task.parameters()).device
    images = batch["image"].to(device)
    masks, labels = batch.get("mask"), batch.get("label")
    recs = dm.load_split(split)[2]
    fixed = fix_target(task, images, target_spec, masks, labels)  # checks the kind against the task's
    x = ExplainInputs(task, images, make_target(task, str(target_spec["kind"]), fixed), black_value(dm),
                      [dm.raw_image(split, i) for i in indices], seed, reference)
    return x, masks, labels, [recs[i]["id"] for i in indices]


def subset_indices(n_total: int, n: int, seed: int) -> list[int]:
    """A fixed, seeded subset of ``n`` of ``n_total`` indices (sorted)."""
    n = min(int(n), int(n_total))
    return sorted(np.random.default_rng(seed).choice(n_total, size=n, replace=False).tolist())


def localisation_table(maps: Mapping[str, torch.Tensor], masks: torch.Tensor | None,
                       k: float = 0.1) -> dict[str, dict[str, np.ndarray]]:
    """Per-image localisation of each map against the ground-truth masks (NaN where undefined,
    e.g. an image with an empty mask or an all-zero map). map -> metric -> B values."""
    if masks is None:
        return {}
    gts = masks[:, 0].cpu().numpy()
    out: dict[str, dict[str, np.ndarray]] = {}
    for name, arr in maps.items():
        rows = [localisation_metrics(arr[i].numpy(), gts[i], k) for i in range(arr.shape[0])]
        out[name] = {m: np.array([r[m] for r in rows], dtype=float) for m in rows[0]}
    return out


def summarise(values: np.ndarray) -> dict[str, Any]:
    """Mean over defined values, with the counts: ``{"mean", "n", "n_undefined"}`` (mean None if
    nothing is defined)."""
    v = np.asarray(values, dtype=float)
    ok = np.isfinite(v)
    return {"mean": float(v[ok].mean()) if ok.any() else None, "n": int(v.size), "n_undefined": int((~ok).sum())}


def save_explanation_grid(task: torch.nn.Module, x: ExplainInputs, masks: torch.Tensor | None,
                          labels: torch.Tensor | None, maps: Mapping[str, torch.Tensor], ids: Sequence[str],
                          path: Any) -> Any:
    """The GlassBox grid (image, mask, prediction, every map) of the explained images; the
    prediction panel and its caption are what the task shows (``task.explain_view``)."""
    from medtrust.report import figures

    gts = masks[:, 0].cpu().numpy() if masks is not None else None
    view = task.explain_view(x.images, labels)
    grid = {k: (v.detach().cpu().numpy() if torch.is_tensor(v) else np.asarray(v)) for k, v in maps.items()
            if k != "slic_uncertainty"}
    return figures.plot_explanation_grid(x.raw, gts, np.asarray(view["pred"]), grid, path, ids, view.get("captions"))
