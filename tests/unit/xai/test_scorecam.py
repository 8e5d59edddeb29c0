"""Score-CAM (medtrust.xai.scorecam): hand-computed values, a naive per-channel loop, exactness of
skipping empty masks, and agreement with pytorch-grad-cam's ScoreCAM."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from medtrust.xai.scorecam import score_cam


class Counting:
    """``forward`` wrapper that counts the inputs it scores."""

    def __init__(self, fn):
        self.fn, self.inputs, self.calls = fn, 0, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs += x.shape[0]
        self.calls += 1
        return self.fn(x)


class Pointwise(nn.Module):
    """1×1 conv with fixed weights: channel 0 = x, channel 1 = 0 (dead), channel 2 = 5 (constant);
    the score is the sum of channel 0 (after the ReLU) over the pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 3, 1), nn.ReLU())
        with torch.no_grad():
            self.features[0].weight.copy_(torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1, 1))
            self.features[0].bias.copy_(torch.tensor([0.0, 0.0, 5.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)[:, 0].sum((1, 2))


@pytest.mark.parametrize("skip", [True, False])
def test_hand_computed_with_dead_and_constant_channels(skip):
    model = Pointwise()
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    # layer resolution = input resolution: upsampling is the identity. Masks: channel 0 ->
    # (x - 1) / 3, channels 1 and 2 (constant) -> all zero. Scores: s0 = sum(x * (x - 1) / 3) = 20/3,
    # s1 = s2 = score of the zero image = 0. cam = w0 * x + w1 * 0 + w2 * 5.
    z = math.exp(20 / 3) + 2
    expected = (math.exp(20 / 3) / z) * x[0, 0] + 5 / z
    fwd = Counting(model)
    cam = score_cam(model, fwd, "features.1", x, skip_zero_channels=skip)
    assert cam.shape == (1, 2, 2)
    torch.testing.assert_close(cam[0], expected, rtol=1e-5, atol=1e-6)
    # capture pass (1 input) + scored inputs: channel 0 and the empty mask once, or all 3 channels
    assert fwd.inputs == 1 + (2 if skip else 3)


def test_hand_computed_with_baseline():
    model = Pointwise()
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    # masked input = 1 + (x - 1) * M: s0 = 4 + sum((x - 1)^2 / 3) = 4 + 14/3; empty masks score
    # forward(baseline) = 4.
    s0 = 4 + 14 / 3
    z = math.exp(s0) + 2 * math.exp(4)
    expected = (math.exp(s0) / z) * x[0, 0] + 5 * math.exp(4) / z
    cam = score_cam(model, model, "features.1", x, baseline=torch.ones(1, 1, 1, 1))
    torch.testing.assert_close(cam[0], expected, rtol=1e-5, atol=1e-6)


class StridedNet(nn.Module):
    """Strided conv (so masks are really upsampled) with some channels forced dead, a linear head."""

    def __init__(self, k: int = 6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, k, 3, stride=2, padding=1)
        self.act = nn.ReLU()
        self.head = nn.Linear(k, 3)
        with torch.no_grad():
            self.conv.weight[1].zero_()  # channel 1 dead everywhere
            self.conv.bias[1] = -1.0
            self.conv.weight[3].zero_()  # channel 3 constant 0.7
            self.conv.bias[3] = 0.7

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.conv(x)).mean((2, 3)))


def naive_score_cam(model: nn.Module, layer: nn.Module, x: torch.Tensor, classes: list[int],
                    weights: str = "softmax") -> torch.Tensor:
    """One image and one channel at a time, straight from the definition (grad-cam conventions)."""
    store = []
    h = layer.register_forward_hook(lambda m, i, o: store.append(o.detach()))
    with torch.no_grad():
        model(x)
    h.remove()
    acts = store[0]
    size = x.shape[-2:]
    out = []
    with torch.no_grad():
        for i in range(x.shape[0]):
            scores = []
            for k in range(acts.shape[1]):
                u = F.interpolate(acts[i, k][None, None], size=size, mode="bilinear", align_corners=True)[0, 0]
                m = (u - u.min()) / (u.max() - u.min() + 1e-8)
                scores.append(model(x[i:i + 1] * m)[0, classes[i]])
            sc = torch.stack(scores)
            if weights == "increase":
                sc = sc - model(torch.zeros_like(x[i:i + 1]))[0, classes[i]]
            w = torch.softmax(sc, 0) if weights == "softmax" else sc
            cam = torch.relu((w[:, None, None] * acts[i]).sum(0))
            out.append(F.interpolate(cam[None, None], size=size, mode="bilinear", align_corners=False)[0, 0])
    return torch.stack(out)


@pytest.mark.parametrize("batch_size", [1, 5, 64])
@pytest.mark.parametrize("layer", ["act", "conv"])  # conv: signed activations, the final ReLU matters
def test_matches_naive_loop_with_per_image_targets(batch_size, layer):
    torch.manual_seed(0)
    model = StridedNet().eval()
    x = torch.randn(3, 2, 11, 9)
    classes = [0, 2, 1]
    fixed = torch.tensor(classes)

    def forward(z: torch.Tensor) -> torch.Tensor:  # the Target convention: whole copies of the batch
        return model(z).gather(1, fixed.repeat(z.shape[0] // 3)[:, None])[:, 0]

    expected = naive_score_cam(model, model.get_submodule(layer), x, classes)
    cam = score_cam(model, forward, layer, x, batch_size=batch_size)
    assert cam.shape == (3, 11, 9) and bool((cam >= 0).all())
    torch.testing.assert_close(cam, expected, rtol=1e-4, atol=1e-6)
    if layer == "conv":
        assert bool((expected == 0).any())  # the ReLU clipped part of the map
    # the layer module itself may be passed instead of its path
    torch.testing.assert_close(score_cam(model, forward, model.get_submodule(layer), x, batch_size=batch_size), cam)


def test_raw_score_weights_match_the_naive_loop():
    torch.manual_seed(1)
    model = StridedNet().eval()
    x = torch.randn(2, 2, 11, 9)
    fixed = torch.tensor([0, 2])

    def forward(z):
        return model(z).gather(1, fixed.repeat(z.shape[0] // 2)[:, None])[:, 0]

    expected = naive_score_cam(model, model.act, x, [0, 2], weights="score")
    torch.testing.assert_close(score_cam(model, forward, "act", x, weights="score"), expected, rtol=1e-4, atol=1e-6)
    inc = naive_score_cam(model, model.act, x, [0, 2], weights="increase")
    torch.testing.assert_close(score_cam(model, forward, "act", x, weights="increase"), inc, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(inc, expected)
    assert not torch.allclose(expected, naive_score_cam(model, model.act, x, [0, 2]))
    with pytest.raises(ValueError, match="weights"):
        score_cam(model, forward, "act", x, weights="mean")


def small_resnet():
    from timm.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    return ResNet(BasicBlock, [1, 1, 1, 1], channels=(16, 32, 64, 128), stem_width=16, num_classes=2, in_chans=1).eval()


def tiny_timm_classifier():
    from medtrust.nets.classifier import TimmClassifier

    torch.manual_seed(0)
    return TimmClassifier("test_resnet", num_classes=2, in_chans=1).eval()


def test_skipping_empty_channels_is_exact_and_saves_passes():
    model = small_resnet()
    torch.manual_seed(1)
    x = torch.randn(2, 1, 64, 64)
    fast, full = Counting(lambda z: model(z)[:, 1]), Counting(lambda z: model(z)[:, 1])
    a = score_cam(model, fast, "layer4", x, batch_size=32, skip_zero_channels=True)
    b = score_cam(model, full, "layer4", x, batch_size=32, skip_zero_channels=False)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert full.inputs == 2 + 2 * 128  # capture + every channel of every image
    assert fast.inputs < 0.8 * full.inputs  # a random ReLU net has ~40 % dead channels here


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def compare_with_grad_cam(model: nn.Module, layer_path: str, x: torch.Tensor, category: int) -> float:
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam import ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer = model.get_submodule(layer_path)
    with ScoreCAM(model=model, target_layers=[layer]) as cam:
        cam.batch_size = 32
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(category)] * x.shape[0])
    ours = score_cam(model, lambda z: model(z)[:, category], layer_path, x, batch_size=32).numpy()
    assert ours.shape == theirs.shape
    r = float(np.mean([pearson(a, b) for a, b in zip(ours, theirs)]))
    print(f"\nScore-CAM vs pytorch-grad-cam ({type(model).__name__}, {layer_path}): mean Pearson r = {r:.10f} (1 - r = {1 - r:.2e})")
    assert r >= 0.99
    # the only remaining difference is grad-cam's final min-max normalisation to [0, 1]
    lo = ours.min((1, 2), keepdims=True)
    normed = (ours - lo) / ((ours - lo).max((1, 2), keepdims=True) + 1e-7)
    np.testing.assert_allclose(normed, theirs, atol=1e-4)
    return r


def test_agrees_with_pytorch_grad_cam_small_timm_resnet():
    model = small_resnet()
    torch.manual_seed(2)
    compare_with_grad_cam(model, "layer4", torch.randn(2, 1, 80, 80), category=1)


def test_agrees_with_pytorch_grad_cam_timm_classifier():
    model = tiny_timm_classifier()
    torch.manual_seed(3)
    compare_with_grad_cam(model, "backbone.layer4", torch.randn(2, 1, 64, 64), category=0)


@pytest.mark.slow
def test_agrees_with_pytorch_grad_cam_resnet18():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=2, in_chans=1).eval()
    torch.manual_seed(4)
    compare_with_grad_cam(model, "layer4", torch.randn(2, 1, 64, 64), category=1)


def test_bad_arguments():
    model = StridedNet().eval()
    x = torch.randn(2, 2, 8, 8)

    def fwd(z):
        return model(z)[:, 0]

    with pytest.raises(KeyError, match="available module paths: .*conv"):
        score_cam(model, fwd, "layer9", x)
    with pytest.raises(ValueError, match="batch_size.*0"):
        score_cam(model, fwd, "act", x, batch_size=0)
    with pytest.raises(ValueError, match=r"4-D.*\(2, 8, 8\)"):
        score_cam(model, fwd, "act", x[0])
    with pytest.raises(ValueError, match="baseline"):
        score_cam(model, fwd, "act", x, baseline=torch.zeros(3, 2, 8, 8))
    with pytest.raises(ValueError, match="B×K×h×w"):
        score_cam(model, fwd, "head", x)  # a B×3 output is not a feature map
    with pytest.raises(ValueError, match="one score per input"):
        score_cam(model, model, "act", x)  # B×3 logits instead of B scores
    with pytest.raises(RuntimeError, match="not called"):
        score_cam(model, fwd, nn.ReLU(), x)  # a module the forward pass never runs
    with pytest.raises(TypeError, match="layer"):
        score_cam(model, fwd, 3, x)
