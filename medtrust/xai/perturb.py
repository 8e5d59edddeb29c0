"""Explanation maps under perturbation (Trustworthy Medical Vision's stability analysis): T
MC-dropout passes, test-time augmentation (geometric transforms inverted before comparison) and
small input noise. Compared with the unperturbed map by :func:`medtrust.metrics.stability.map_stability`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from medtrust.metrics.stability import map_stability
from medtrust.xai.methods import ExplainInputs, ExplanationMethod
from medtrust.xai.targets import Target

FLIPS = {"hflip": (-1,), "vflip": (-2,), "hvflip": (-2, -1)}
PERTURBATIONS = ("mc_dropout", "tta", "noise")


def dropout_modules(task: nn.Module) -> list[nn.Module]:
    """Every dropout module of ``task`` (``nn.Dropout``/``Dropout2d``/…; timm ``DropPath``), whatever its rate."""
    return [m for m in task.modules() if isinstance(m, nn.modules.dropout._DropoutNd) or type(m).__name__ == "DropPath"]


def _drop_rate(module: nn.Module) -> float:
    # nn.Dropout* keep the rate in ``p``; timm's and MONAI's DropPath in ``drop_prob``
    return float(getattr(module, "p", getattr(module, "drop_prob", 0.0)) or 0.0)


def active_dropout_modules(task: nn.Module) -> list[nn.Module]:
    """The dropout modules of ``task`` that actually drop something: ``nn.Dropout*`` with ``p > 0`` and
    ``DropPath`` with ``drop_prob > 0``. Only these make MC-dropout passes differ.

    Args:
        task: any module (a task or a bare net).

    Returns:
        The modules, in ``task.modules()`` order (empty when MC dropout would be deterministic).
    """
    return [m for m in dropout_modules(task) if _drop_rate(m) > 0]


def mc_dropout_undefined_reason(task: nn.Module) -> str | None:
    """Why MC-dropout explanation stability is undefined for ``task`` (no active dropout module), or None."""
    if active_dropout_modules(task):
        return None
    n = len(dropout_modules(task))
    return (f"undefined: no dropout module with p > 0 in {type(task).__name__} "
            f"({n} dropout module(s) with p = 0); every MC pass would be identical")


class PerturbedMaps(dict):
    """``perturbation -> map name -> T×B×H×W`` (a plain dict), plus ``undefined``: perturbation ->
    reason for every configured perturbation that is undefined for this model and therefore absent,
    e.g. ``{"mc_dropout": "undefined: no dropout module with p > 0 in SegmentationTask ..."}``.
    Callers write ``undefined`` into their results instead of a stability value."""

    def __init__(self, *args: Any, undefined: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.undefined: dict[str, str] = dict(undefined or {})


def _run(method: ExplanationMethod, x: ExplainInputs) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu() for k, v in method(x).items()}


def mc_dropout_maps(method: ExplanationMethod, x: ExplainInputs, samples: int) -> dict[str, torch.Tensor]:
    """Maps under ``samples`` passes with only the active dropout modules (:func:`active_dropout_modules`)
    in training mode (seeded by ``x.seed``). Returns name -> T×B×H×W.

    Raises:
        ValueError: the model has no dropout module with p > 0 (MC-dropout stability is undefined:
            every pass would be identical and every map would look perfectly stable).
    """
    reason = mc_dropout_undefined_reason(x.task)
    if reason is not None:
        raise ValueError(f"MC-dropout explanation stability is {reason} (set model dropout > 0 or drop "
                         "mc_dropout from xai stability)")
    mods = active_dropout_modules(x.task)
    states = [m.training for m in mods]
    out: dict[str, list[torch.Tensor]] = {}
    try:
        for m in mods:
            m.train()
        with torch.random.fork_rng():
            torch.manual_seed(x.seed)
            for _ in range(int(samples)):
                for k, v in _run(method, x).items():
                    out.setdefault(k, []).append(v)
    finally:
        for m, s in zip(mods, states):
            m.train(s)
    return {k: torch.stack(v) for k, v in out.items()}


def tta_maps(method: ExplanationMethod, x: ExplainInputs, flips: Sequence[str]) -> dict[str, torch.Tensor]:
    """Maps of flipped images, flipped back; a fixed target region is flipped with the image.
    Returns name -> T×B×H×W (T = number of flips)."""
    bad = [f for f in flips if f not in FLIPS]
    if bad:
        raise ValueError(f"xai stability tta: unknown transform(s) {bad}; choose from {list(FLIPS)}")
    out: dict[str, list[torch.Tensor]] = {}
    for f in flips:
        dims = FLIPS[f]
        fixed = x.target.fixed
        if fixed is not None and fixed.dim() == 4:  # a region moves with the image; a class does not
            fixed = fixed.flip(dims)
        xf = replace(x, images=x.images.flip(dims), target=Target(x.target.task, x.target.kind, fixed),
                     raw=None if x.raw is None else [np.flip(r, axis=tuple(d + 1 for d in dims)).copy() for r in x.raw])
        for k, v in _run(method, xf).items():
            out.setdefault(k, []).append(v.flip(dims))
    return {k: torch.stack(v) for k, v in out.items()}


def noise_maps(method: ExplanationMethod, x: ExplainInputs, std: float, n: int) -> dict[str, torch.Tensor]:
    """Maps of ``n`` copies with Gaussian noise of ``std`` (in the model's normalised units) added,
    seeded by ``x.seed``. Returns name -> T×B×H×W."""
    gen = torch.Generator().manual_seed(x.seed)
    out: dict[str, list[torch.Tensor]] = {}
    for _ in range(int(n)):
        noisy = x.images + float(std) * torch.randn(x.images.shape, generator=gen).to(x.images)
        for k, v in _run(method, replace(x, images=noisy)).items():
            out.setdefault(k, []).append(v)
    return {k: torch.stack(v) for k, v in out.items()}


def perturbed_maps(method: ExplanationMethod, x: ExplainInputs, cfg: dict[str, Any]) -> PerturbedMaps:
    """All configured perturbations: ``cfg`` keys ``mc_dropout`` (T, 0 = off), ``tta`` (list of
    flips), ``noise_std`` and ``n_noise``.

    Returns:
        perturbation -> map name -> T×B×H×W, as a :class:`PerturbedMaps` whose ``undefined`` names the
        configured perturbations left out and why (``mc_dropout`` on a model without dropout p > 0).

    Raises:
        ValueError: an unknown key in ``cfg``.
    """
    unknown = set(cfg) - {"mc_dropout", "tta", "noise_std", "n_noise"}
    if unknown:
        raise ValueError(f"xai stability: unknown key(s) {sorted(unknown)}; allowed mc_dropout, tta, noise_std, n_noise")
    res = PerturbedMaps()
    if int(cfg.get("mc_dropout") or 0) > 0:
        reason = mc_dropout_undefined_reason(x.task)
        if reason is None:
            res["mc_dropout"] = mc_dropout_maps(method, x, int(cfg["mc_dropout"]))
        else:
            res.undefined["mc_dropout"] = reason
    if cfg.get("tta"):
        res["tta"] = tta_maps(method, x, list(cfg["tta"]))
    if float(cfg.get("noise_std") or 0) > 0 and int(cfg.get("n_noise") or 0) > 0:
        res["noise"] = noise_maps(method, x, float(cfg["noise_std"]), int(cfg["n_noise"]))
    return res


def stability_table(reference: dict[str, torch.Tensor], perturbed: dict[str, dict[str, torch.Tensor]],
                    k: float = 0.1) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """Per-image stability of each map under each perturbation, against the unperturbed map.

    Returns:
        map name -> perturbation -> ``{"topk_iou", "spearman", "com_shift_px"}`` arrays of B values.
    """
    out: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for pert, maps in perturbed.items():
        for name, arr in maps.items():
            ref = reference[name].numpy()
            per = [map_stability(arr[:, b].numpy(), ref[b], k) for b in range(ref.shape[0])]
            out.setdefault(name, {})[pert] = {m: np.array([p[m] for p in per], dtype=float)
                                              for m in ("topk_iou", "spearman", "com_shift_px")}
    return out
