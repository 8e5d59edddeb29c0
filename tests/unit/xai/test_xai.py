"""XAI building blocks: targets, baselines, layer lookup, localisation metrics, SLIC confidence."""
from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from monai.losses import DiceLoss

from medtrust.metrics.localisation import pointing_game, relevance_mass
from medtrust.nets.unet import attention_unet
from medtrust.tasks.segmentation import SegmentationTask
from medtrust.xai.attribution import integrated_gradients, make_baseline, saliency
from medtrust.xai.cam import attention_unet_layers, get_module, layer_gradcam
from medtrust.xai.superpixels import slic_confidence
from medtrust.xai.targets import fix_target, make_target


@pytest.fixture(scope="module")
def task():
    torch.manual_seed(0)
    net = attention_unet(3, 1, channels=[4, 8, 16], strides=[2, 2], input_size=[16, 16])
    return SegmentationTask(net, DiceLoss(sigmoid=True), partial(torch.optim.SGD, lr=0.1)).eval()


def test_localisation_metrics_hand_computed():
    mask = np.zeros((4, 4))
    mask[:2, :2] = 1
    heat = np.zeros((4, 4))
    heat[0, 0], heat[3, 3] = 3.0, 1.0
    assert pointing_game(heat, mask) == 1.0
    assert relevance_mass(heat, mask) == pytest.approx(0.75)
    heat[3, 3] = 5.0
    assert pointing_game(heat, mask) == 0.0
    assert np.isnan(pointing_game(np.zeros((4, 4)), mask))  # all-zero map is undefined, not 0
    assert np.isnan(relevance_mass(np.full((4, 4), np.nan), mask))


def test_ig_completeness_and_saliency_shape(task):
    x = torch.rand(2, 3, 16, 16)
    spec = {"kind": "region_logit", "region": "pred"}
    fwd = make_target(task, "region_logit", fix_target(task, x, spec))
    base = make_baseline(x, "mean")
    attr = integrated_gradients(fwd, x, base, n_steps=64, internal_batch_size=16)
    # completeness: attributions sum to f(x) - f(baseline)
    with torch.no_grad():
        diff = fwd(x) - fwd(base)
    assert attr.sum((1, 2)).tolist() == pytest.approx(diff.tolist(), rel=0.05, abs=0.05)
    assert saliency(fwd, x).shape == (2, 16, 16)


@pytest.mark.parametrize("kind", ["black", "blur", "mean", "noise"])
def test_baselines_have_image_shape(kind):
    x = torch.rand(2, 3, 16, 16)
    assert make_baseline(x, kind).shape == x.shape
    with pytest.raises(ValueError, match="xai.ig.baseline"):
        make_baseline(x, "white")


def test_gradcam_layers_and_unknown_layer_lists_paths(task):
    groups = attention_unet_layers(task)
    assert set(groups) == {"encoder", "attention", "decoder", "output"}
    x = torch.rand(2, 3, 16, 16)
    fwd = make_target(task, "region_prob", fix_target(task, x, {"kind": "region_prob", "region": "pred"}))
    cam = layer_gradcam(task, fwd, groups["decoder"][-1], x)
    assert cam.shape == (2, 16, 16) and (cam >= 0).all()
    with pytest.raises(KeyError, match="available module paths: .*net.model"):
        get_module(task, "net.no_such_layer")


def test_slic_confidence_is_piecewise_constant():
    img = np.random.default_rng(0).random((32, 32, 3))
    prob = np.linspace(0, 1, 32 * 32).reshape(32, 32)
    mean, std, seg = slic_confidence(img, prob, n_segments=20)
    for s in np.unique(seg):
        assert np.allclose(mean[seg == s], prob[seg == s].mean())
