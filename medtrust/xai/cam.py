"""Layer Grad-CAM (captum ``LayerGradCam``) at named layers, upsampled to the input size."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from captum.attr import LayerAttribution, LayerGradCam


def get_module(model: nn.Module, path: str) -> nn.Module:
    """Module at dotted ``path``.

    Raises:
        KeyError: unknown path; the message lists the available module paths.
    """
    modules = dict(model.named_modules())
    if path not in modules:
        avail = [k for k in modules if k]
        shown = ", ".join(avail[:60]) + (" ..." if len(avail) > 60 else "")
        raise KeyError(f"unknown layer {path!r}; available module paths: {shown}")
    return modules[path]


def attention_unet_layers(task: nn.Module) -> dict[str, list[str]]:
    """GlassBox's layer groups of a MONAI Attention U-Net inside ``task``: encoder conv blocks
    (shallow to deep), attention gates, decoder merge convolutions (deep to shallow) and the output
    convolution."""
    from monai.networks.nets.attentionunet import AttentionBlock, AttentionLayer, ConvBlock

    groups: dict[str, list[str]] = {"encoder": [], "attention": [], "decoder": [], "output": []}
    for name, m in task.named_modules():
        if isinstance(m, ConvBlock):
            groups["encoder"].append(name)
        elif isinstance(m, AttentionBlock):
            groups["attention"].append(name)
        elif isinstance(m, AttentionLayer):
            groups["decoder"].append(f"{name}.merge")
    if not groups["encoder"] and not groups["attention"]:
        return {}  # not an Attention U-Net
    groups["decoder"].reverse()
    groups["attention"].reverse()
    convs = [n for n, m in task.named_modules() if isinstance(m, nn.Conv2d)]
    groups["output"] = [convs[-1].rsplit(".conv", 1)[0]] if convs else []
    return {k: v for k, v in groups.items() if v}


def layer_gradcam(model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], layer: str,
                  images: torch.Tensor, relu: bool = True) -> torch.Tensor:
    """Grad-CAM of ``forward``'s scalar target at ``layer``, bilinearly upsampled. Returns B×H×W."""
    cam = LayerGradCam(forward, get_module(model, layer))
    attr = cam.attribute(images, relu_attributions=relu)
    return LayerAttribution.interpolate(attr, tuple(images.shape[-2:]), interpolate_mode="bilinear")[:, 0].detach()


def timm_last_stage_layers(task: nn.Module) -> list[str]:
    """Module path of the last feature stage of every timm backbone inside ``task`` (one per
    ensemble member), from timm's ``feature_info`` (e.g. ``net.backbone.layer4`` for a ResNet)."""
    out = []
    for name, m in task.named_modules():
        info = getattr(m, "feature_info", None)
        if info is None or not hasattr(m, "forward_features"):
            continue
        last = info[-1]["module"] if isinstance(info, list) else info.module_name()[-1]
        out.append(f"{name}.{last}" if name else last)
    return out


def default_cam_layers(task: nn.Module) -> dict[str, list[str]]:
    """Default CAM layers by architecture (not by task): GlassBox's encoder/attention/decoder/output
    groups for an Attention U-Net; the last conv stage of every timm backbone; else the last
    ``nn.Conv2d`` of the model (``last_conv``)."""
    groups = attention_unet_layers(task)
    if groups:
        return groups
    layers = timm_last_stage_layers(task)
    if layers:
        return {"last_stage": layers}
    convs = [n for n, m in task.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"no default CAM layer for {type(task).__name__} (no Conv2d): give xai layers as module paths")
    return {"last_conv": convs[-1:]}


def resolve_cam_layers(task: nn.Module, spec: object) -> dict[str, list[str]]:
    """``auto``/``None`` -> :func:`default_cam_layers`; a list of module paths -> ``{"selected": [...]}``
    (each checked; an unknown path lists the available ones)."""
    if spec in (None, "auto"):
        return default_cam_layers(task)
    layers = [str(p) for p in spec]  # type: ignore[union-attr]
    for layer in layers:
        get_module(task, layer)
    return {"selected": layers}
