"""Explanation methods as small configured objects (``conf/xai/*.yaml`` ``methods:`` entries with a
``_target_``), one interface for every task: ``method(inputs) -> {map name: B×H×W tensor}``.

Each wraps a library implementation (captum's Saliency, IntegratedGradients, GradientShap,
Occlusion, LayerGradCam; scikit-image's SLIC) or ours where measurably better (batched Score-CAM,
:mod:`medtrust.xai.scorecam`). The scalar being explained is a :class:`~medtrust.xai.targets.Target`
with its region / class fixed on the unperturbed image.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from captum.attr import GradientShap as _GradientShap
from captum.attr import Occlusion as _Occlusion

from medtrust.xai.attribution import BASELINES, integrated_gradients, make_baseline, saliency
from medtrust.xai.cam import layer_gradcam, resolve_cam_layers
from medtrust.xai.superpixels import slic_confidence
from medtrust.xai.targets import Target, as_probability


@dataclass
class ExplainInputs:
    """What a method needs. ``images``: B×C×H×W as the model sees them (normalised); ``target``:
    the fixed scalar target; ``black``: C×1×1 value of a black pixel after normalisation (IG's
    black baseline); ``raw``: B images H×W×C in [0, 1] (SLIC); ``reference``: N×C×H×W real images,
    normalised (GradientShap's ``reference`` baseline distribution; ``xai.reference``)."""

    task: nn.Module
    images: torch.Tensor
    target: Target
    black: torch.Tensor | None = None
    raw: Sequence[np.ndarray] | None = None
    seed: int = 0
    reference: torch.Tensor | None = None

    def on(self, task: nn.Module) -> ExplainInputs:
        """The same inputs explained on another model (the sanity check's randomised copy)."""
        return replace(self, task=task, target=Target(task, self.target.kind, self.target.fixed))


class ExplanationMethod:
    """Base: ``name`` (map name prefix) and ``gradient`` (whether the model-randomisation sanity
    check applies: maps depend on the weights through gradients/activations). A method applies to
    any task of the contract (it explains ``task.explain_target``); one that needs more of the task
    says so in :meth:`check`."""

    name = "method"
    gradient = True

    def check(self, task: nn.Module) -> None:
        """Raise when the method cannot apply to ``task`` (named)."""
        if not hasattr(task, "explain_target"):
            raise ValueError(f"xai method {self.name!r} needs a task of the medtrust contract (explain_target); "
                             f"got {type(task).__name__}")

    def __call__(self, x: ExplainInputs) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def _check_output(output: str) -> str:
    if output not in ("logit", "prob"):
        raise ValueError(f"xai method output must be 'logit' or 'prob', got {output!r}")
    return output


def _check_baselines(method: str, baselines: Sequence[str]) -> None:
    if not baselines or any(b not in BASELINES for b in baselines):
        raise ValueError(f"xai {method} baselines must be a non-empty list from {BASELINES}, got {list(baselines)}")


def _target_for(x: ExplainInputs, output: str) -> Target:
    return x.target.with_kind(as_probability(x.target.kind, x.task)) if output == "prob" else x.target


class Saliency(ExplanationMethod):
    """|∂ target / ∂ input| (captum ``Saliency``; Simonyan et al., 2014), max over channels, on the
    raw logit or the probability (GlassBox shows both). Map ``saliency_<output>``."""

    def __init__(self, output: str = "logit") -> None:
        self.output = _check_output(output)
        self.name = f"saliency_{output}"

    def __call__(self, x: ExplainInputs) -> dict[str, torch.Tensor]:
        return {self.name: saliency(_target_for(x, self.output), x.images)}


class IntegratedGradients(ExplanationMethod):
    """Integrated gradients (captum; Sundararajan et al., 2017), one map ``ig_<baseline>`` per
    baseline (black, blur, mean, noise: the baseline is a reported choice)."""

    name = "integrated_gradients"

    def __init__(self, baselines: Sequence[str] = ("black",), n_steps: int = 32, internal_batch_size: int | None = 8,
                 output: str = "logit") -> None:
        _check_baselines("integrated_gradients", baselines)
        if n_steps < 2:
            raise ValueError(f"xai integrated_gradients n_steps must be >= 2, got {n_steps}")
        self.baselines, self.n_steps, self.ibs = list(baselines), int(n_steps), internal_batch_size
        self.output = _check_output(output)

    def __call__(self, x: ExplainInputs) -> dict[str, torch.Tensor]:
        fwd = _target_for(x, self.output)
        return {f"ig_{b}": integrated_gradients(fwd, x.images, make_baseline(x.images, b, x.black, x.seed),
                                                self.n_steps, self.ibs, fwd.fixed) for b in self.baselines}


class GradientShap(ExplanationMethod):
    """GradientShap (captum; Lundberg & Lee, 2017): expected gradients over a baseline distribution
    (the listed baselines) with ``n_samples`` noisy draws per image, summed over channels.

    ``reference`` as a baseline is SHAP's background set: real images (``xai.reference``: split, count,
    label), from which captum draws one baseline per sample. The cost is ``n_samples`` forward and
    backward passes per image whatever the reference's size (only its memory grows with it)."""

    name = "gradient_shap"

    def __init__(self, baselines: Sequence[str] = ("black", "blur"), n_samples: int = 16, stdevs: float = 0.1,
                 output: str = "logit") -> None:
        _check_baselines("gradient_shap", [b for b in baselines if b != "reference"] or ["black"])
        if n_samples < 1:
            raise ValueError(f"xai gradient_shap n_samples must be >= 1, got {n_samples}")
        self.baselines, self.n_samples, self.stdevs = list(baselines), int(n_samples), float(stdevs)
        self.output = _check_output(output)

    def __call__(self, x: ExplainInputs) -> dict[str, torch.Tensor]:
        fwd = _target_for(x, self.output)
        maps = []
        with torch.random.fork_rng():
            torch.manual_seed(x.seed)
            for i in range(x.images.shape[0]):  # a baseline distribution per image
                img = x.images[i:i + 1]
                base = torch.cat([self._reference(x) if b == "reference" else make_baseline(img, b, x.black, x.seed)
                                  for b in self.baselines])
                args = None if fwd.fixed is None else (fwd.fixed[i:i + 1],)
                attr = _GradientShap(fwd).attribute(img, baselines=base, n_samples=self.n_samples, stdevs=self.stdevs,
                                                   additional_forward_args=args)
                maps.append(attr.sum(1).detach())
        return {self.name: torch.cat(maps)}


    @staticmethod
    def _reference(x: ExplainInputs) -> torch.Tensor:
        if x.reference is None or not len(x.reference):
            raise ValueError("xai gradient_shap baselines [reference] need real reference images: set xai.reference "
                             "(e.g. {split: train, n: 1000, label: null})")
        return x.reference.to(x.images)


class Occlusion(ExplanationMethod):
    """Occlusion (captum; Zeiler & Fergus, 2014): drop of the target when a ``window``-pixel square
    is replaced by the baseline (0 = the normalised mean), slid with ``stride``. Not gradient-based."""

    name = "occlusion"
    gradient = False

    def __init__(self, window: int = 8, stride: int = 4, baseline: float = 0.0, perturbations_per_eval: int = 16,
                 output: str = "prob") -> None:
        if window < 1 or stride < 1:
            raise ValueError(f"xai occlusion window and stride must be >= 1, got {window}, {stride}")
        self.window, self.stride, self.baseline = int(window), int(stride), float(baseline)
        self.ppe, self.output = int(perturbations_per_eval), _check_output(output)

    def __call__(self, x: ExplainInputs) -> dict[str, torch.Tensor]:
        fwd = _target_for(x, self.output)
        c = x.images.shape[1]
        with torch.no_grad():
            attr = _Occlusion(fwd).attribute(x.images, sliding_window_shapes=(c, self.window, self.window),
                                            strides=(c, self.stride, self.stride), baselines=self.baseline,
                                            perturbations_per_eval=self.ppe)
        return {self.name: attr.sum(1).detach()}


class GradCAM(ExplanationMethod):
    """Layer Grad-CAM (captum ``LayerGradCam``; Selvaraju et al., 2017) at named layers.

    ``layers: auto``: GlassBox's encoder / attention / decoder / output groups of the Attention
    U-Net (the group's last layer is the group map ``gradcam_<group>``), or the last conv stage of
    a timm backbone (``gradcam``; an ensemble's members' maps are averaged). ``groups`` restricts to
    the last layer of the named groups (cheap, for the training callback). Every layer's map is
    kept in ``self.layer_maps`` for the layer-wise figure.
    """

    name = "gradcam"

    def __init__(self, layers: Any = "auto", groups: Sequence[str] | None = None, relu: bool = True) -> None:
        self.layers, self.relu = layers, bool(relu)
        self.groups = list(groups) if groups else None
        self.layer_maps: dict[str, dict[str, torch.Tensor]] = {}

    def __call__(self, x: ExplainInputs) -> dict[str, torch.Tensor]:
        groups = resolve_cam_layers(x.task, self.layers)
        if self.groups:
            missing = [g for g in self.groups if g not in groups]
            if missing:
                raise ValueError(f"xai gradcam groups {missing} not among the layer groups {sorted(groups)}")
            groups = {g: groups[g][-1:] for g in self.groups}  # the group's last layer only
        self.layer_maps = {g: {layer: layer_gradcam(x.task, x.target, layer, x.images, self.relu) for layer in ls}
                           for g, ls in groups.items()}
        out = {}
        for g, lm in self.layer_maps.items():
            if g in ("last_stage", "selected", "last_conv") and len(groups) == 1:
                out[self.name] = torch.stack(list(lm.values())).mean(0) if g == "last_stage" else list(lm.values())[-1]
            else:
                out[f"{self.name}_{g}"] = list(lm.values())[-1]
        return out


class ScoreCAM(ExplanationMethod):
    """Score-CAM (Wang et al., 2020), our batched implementation (:func:`medtrust.xai.scorecam.score_cam`):
    channel weights from the target score of the input masked by each upsampled activation map;
    channels that are zero everywhere are skipped exactly. ``layer: auto`` = the default CAM layer
    (the last conv stage; for the U-Net the decoder's last merge). ``weights``: ``softmax`` over
    channels (pytorch-grad-cam, for class logits) or ``score`` (the masked inputs' scores
    themselves, for a segmentation's sum of sigmoid over a region)."""

    name = "scorecam"

    def __init__(self, layer: Any = "auto", batch_size: int = 32, output: str = "logit", weights: str = "softmax",
                 baseline: str | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"xai scorecam batch_size must be >= 1, got {batch_size}")
        if weights not in ("softmax", "score", "increase"):
            raise ValueError(f"xai scorecam weights must be softmax, score or increase, got {weights!r}")
        self.layer, self.batch_size, self.output = layer, int(batch_size), _check_output(output)
        self.weights = weights
        if baseline is not None and baseline not in BASELINES:
            raise ValueError(f"xai scorecam baseline must be null (zeros, as pytorch-grad-cam) or one of {BASELINES}, got {baseline!r}")
        self.baseline = baseline

    def _layers(self, task: nn.Module) -> list[str]:
        if self.layer in (None, "auto"):
            groups = resolve_cam_layers(task, "auto")
            return groups["decoder"][-1:] if "decoder" in groups else groups.get("last_stage") or groups["last_conv"]
        return resolve_cam_layers(task, [self.layer])["selected"]

    def __call__(self, x: ExplainInputs) -> dict[str, torch.Tensor]:
        from medtrust.xai.scorecam import score_cam

        fwd = _target_for(x, self.output)
        maps = [score_cam(x.task, fwd, layer, x.images, batch_size=self.batch_size, weights=self.weights,
                          baseline=None if self.baseline is None else make_baseline(x.images, self.baseline, x.black, x.seed)) for layer in self._layers(x.task)]
        return {self.name: torch.stack(maps).mean(0)}


class SLICConfidence(ExplanationMethod):
    """SLIC superpixel confidence (GlassBox; scikit-image ``slic``): mean predicted probability per
    superpixel (``slic_confidence``) and its within-superpixel spread (``slic_uncertainty``)."""

    name = "slic_confidence"
    gradient = False

    def __init__(self, n_segments: int = 100, compactness: float = 10.0) -> None:
        if n_segments < 2:
            raise ValueError(f"xai slic n_segments must be >= 2, got {n_segments}")
        self.n_segments, self.compactness = int(n_segments), float(compactness)

    def check(self, task: nn.Module) -> None:
        super().check(task)
        if not getattr(task, "has_pixel_probabilities", False):
            raise ValueError(f"xai method {self.name!r} does not apply to a {getattr(task, 'task_name', type(task).__name__)} "
                             "task: it needs per-pixel probabilities (task.has_pixel_probabilities)")

    def __call__(self, x: ExplainInputs) -> dict[str, torch.Tensor]:
        if x.raw is None:
            raise ValueError("slic_confidence needs the un-normalised images (ExplainInputs.raw)")
        prob = np.asarray(x.task.explain_view(x.images, None)["pixel_prob"])
        res = [slic_confidence(x.raw[i], prob[i], self.n_segments, self.compactness, seed=x.seed)
               for i in range(len(prob))]
        return {self.name: torch.as_tensor(np.stack([r[0] for r in res])).float(),
                "slic_uncertainty": torch.as_tensor(np.stack([r[1] for r in res])).float()}


def run_methods(methods: dict[str, ExplanationMethod], x: ExplainInputs) -> dict[str, torch.Tensor]:
    """All maps of all ``methods`` (each checked against the task first). Returns name -> B×H×W (CPU)."""
    for m in methods.values():
        m.check(x.task)
    out: dict[str, torch.Tensor] = {}
    for m in methods.values():
        for k, v in m(x).items():
            out[k] = v.detach().float().cpu()
    return out
