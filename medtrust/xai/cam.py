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
