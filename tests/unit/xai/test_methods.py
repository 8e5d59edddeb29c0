"""One target interface and one method interface for every task; perturbations; the callback."""
from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
import torch.nn as nn
from monai.losses import DiceLoss

from medtrust.nets.classifier import EnsembleClassifier, TimmClassifier
from medtrust.nets.unet import attention_unet
from medtrust.tasks.classification import ClassificationTask
from medtrust.tasks.segmentation import SegmentationTask
from medtrust.xai import methods as M
from medtrust.xai.cam import default_cam_layers
from medtrust.xai.perturb import mc_dropout_maps, noise_maps, perturbed_maps, tta_maps
from medtrust.xai.pipeline import build_methods, summarise
from medtrust.xai.targets import fix_target, make_target


@pytest.fixture(scope="module")
def seg():
    torch.manual_seed(0)
    net = attention_unet(3, 1, channels=[4, 8, 16], strides=[2, 2], input_size=[16, 16], dropout=0.2)
    return SegmentationTask(net, DiceLoss(sigmoid=True), partial(torch.optim.SGD, lr=0.1)).eval()


@pytest.fixture(scope="module")
def cls():
    torch.manual_seed(0)
    net = TimmClassifier("resnet18", num_classes=2, in_chans=1, head_dropout=0.5)
    return ClassificationTask(net, nn.CrossEntropyLoss(), partial(torch.optim.SGD, lr=0.1), mc_samples=4).eval()


def inputs(task, images, spec, raw=True):
    fixed = fix_target(task, images, spec)
    return M.ExplainInputs(task, images, make_target(task, spec["kind"], fixed), None,
                           [np.random.default_rng(0).random((*images.shape[-2:], images.shape[1]))] * len(images) if raw else None)


SEG_SPEC = {"kind": "region_logit", "region": "pred"}
CLS_SPEC = {"kind": "class_logit", "class": "pred"}


def test_targets_fixed_per_image_and_wrong_kind_named(seg, cls):
    x = torch.rand(3, 1, 32, 32)
    fixed = fix_target(cls, x, CLS_SPEC)
    t = make_target(cls, "class_logit", fixed)
    with torch.no_grad():
        logits = cls(x)
        assert torch.allclose(t(x), logits.gather(1, fixed[:, None])[:, 0])
        # a batch of whole copies (captum IG / occlusion) gets the same class per copy
        assert torch.allclose(t(torch.cat([x, x])), torch.cat([t(x), t(x)]))
        p = t.with_kind("class_prob")(x)
        assert torch.allclose(p, torch.softmax(logits, -1).gather(1, fixed[:, None])[:, 0])
    with pytest.raises(ValueError, match="class_logit.*does not apply to a segmentation task"):
        fix_target(seg, torch.rand(1, 3, 16, 16), CLS_SPEC)
    with pytest.raises(ValueError, match="region=mask but"):
        fix_target(seg, torch.rand(1, 3, 16, 16), {"kind": "region_logit", "region": "mask"})
    with pytest.raises(ValueError, match=r"class index in \[0, 2\)"):
        fix_target(cls, x, {"kind": "class_logit", "class": 5})


ALL = {
    "saliency": M.Saliency(), "saliency_p": M.Saliency("prob"),
    "ig": M.IntegratedGradients(["black", "blur"], n_steps=4, internal_batch_size=4),
    "shap": M.GradientShap(["black"], n_samples=2), "occ": M.Occlusion(window=4, stride=4),
    "gradcam": M.GradCAM(), "scorecam": M.ScoreCAM(batch_size=16),
}


@pytest.mark.parametrize("which", ["seg", "cls"])
def test_every_method_gives_one_map_per_image(which, seg, cls):
    task, spec, x = (seg, SEG_SPEC, torch.rand(2, 3, 16, 16)) if which == "seg" else (cls, CLS_SPEC, torch.rand(2, 1, 32, 32))
    maps = M.run_methods(ALL, inputs(task, x, spec))
    expected = {"saliency_logit", "saliency_prob", "ig_black", "ig_blur", "gradient_shap", "occlusion", "scorecam"}
    assert expected <= set(maps)
    assert ({"gradcam_encoder", "gradcam_attention", "gradcam_decoder", "gradcam_output"} <= set(maps)
            if which == "seg" else "gradcam" in maps)
    for name, m in maps.items():
        assert m.shape == (2, *x.shape[-2:]), name
        assert torch.isfinite(m).all(), name


def test_method_that_cannot_apply_is_named(cls):
    with pytest.raises(ValueError, match="slic_confidence.*does not apply to a classification task"):
        M.run_methods({"slic": M.SLICConfidence()}, inputs(cls, torch.rand(1, 1, 32, 32), CLS_SPEC))
    with pytest.raises(ValueError, match="baselines"):
        M.IntegratedGradients(["white"])
    with pytest.raises(KeyError, match="not configured under xai.methods.*configured"):
        build_methods({"gradcam": {"_target_": "medtrust.xai.methods.GradCAM"}}, only=["nope"])


def test_default_cam_layers_by_task(seg, cls):
    assert set(default_cam_layers(seg)) == {"encoder", "attention", "decoder", "output"}
    assert default_cam_layers(cls) == {"last_stage": ["net.backbone.layer4"]}
    ens = ClassificationTask(EnsembleClassifier(members=2, backbone="resnet18", in_chans=1), nn.CrossEntropyLoss(),
                             partial(torch.optim.SGD, lr=0.1))
    assert default_cam_layers(ens) == {"last_stage": ["net.members.0.backbone.layer4", "net.members.1.backbone.layer4"]}


class ChannelSum(M.ExplanationMethod):
    """A 'method' that is exactly flip-equivariant and model-independent: the image itself."""

    name = "identity"
    gradient = False

    def __call__(self, x):
        return {"identity": x.images.sum(1)}


def test_tta_inverts_the_flip_and_flips_a_fixed_region(seg):
    x = inputs(seg, torch.rand(2, 3, 16, 16), SEG_SPEC)
    out = tta_maps(ChannelSum(), x, ["hflip", "vflip", "hvflip"])["identity"]
    assert out.shape == (3, 2, 16, 16)
    assert torch.allclose(out, x.images.sum(1).expand_as(out))  # inverted: equals the unperturbed map
    seen = []

    class Region(M.ExplanationMethod):
        gradient = False

        def __call__(self, xi):
            seen.append(xi.target.fixed.clone())
            return {"r": xi.target.fixed[:, 0].float()}

    back = tta_maps(Region(), x, ["hflip"])["r"][0]
    assert torch.equal(seen[0], x.target.fixed.flip(-1)) and torch.equal(back, x.target.fixed[:, 0].float())
    with pytest.raises(ValueError, match="unknown transform"):
        tta_maps(ChannelSum(), x, ["rot45"])


def test_mc_dropout_and_noise_vary_seeded_and_no_dropout_is_an_error(cls):
    x = inputs(cls, torch.rand(2, 1, 32, 32), CLS_SPEC, raw=False)
    a = mc_dropout_maps(M.GradCAM(), x, 3)["gradcam"]
    b = mc_dropout_maps(M.GradCAM(), x, 3)["gradcam"]
    assert a.shape == (3, 2, 32, 32) and torch.equal(a, b) and (a[0] - a[1]).abs().max() > 0
    assert not cls.net.dropout.training  # switched back off
    n1, n2 = noise_maps(ChannelSum(), x, 0.1, 2)["identity"], noise_maps(ChannelSum(), x, 0.1, 2)["identity"]
    assert torch.equal(n1, n2) and not torch.equal(n1[0], n1[1])
    plain = ClassificationTask(TimmClassifier("resnet18", in_chans=1, head_dropout=0.0), nn.CrossEntropyLoss(),
                               partial(torch.optim.SGD, lr=0.1)).eval()
    plain.net.dropout = nn.Identity()
    with pytest.raises(ValueError, match="no dropout module"):
        mc_dropout_maps(M.GradCAM(), inputs(plain, torch.rand(1, 1, 32, 32), CLS_SPEC, raw=False), 2)
    with pytest.raises(ValueError, match="unknown key"):
        perturbed_maps(ChannelSum(), x, {"mc_dropout": 2, "jitter": 1})


def test_summarise_counts_undefined_and_never_averages_it():
    assert summarise(np.array([1.0, np.nan, 0.0])) == {"mean": 0.5, "n": 3, "n_undefined": 1}
    assert summarise(np.array([np.nan])) == {"mean": None, "n": 1, "n_undefined": 1}


class _Trainer:
    def __init__(self, metrics):
        self.callback_metrics, self.sanity_checking, self.loggers, self.global_step = metrics, False, [], 0


def test_ig_grouped_by_internal_batch_size_equals_one_pass(cls):
    x = inputs(cls, torch.rand(3, 1, 32, 32), CLS_SPEC, raw=False)
    x.target.fixed = torch.tensor([0, 1, 0])  # different classes per image: the grouping must follow them
    one = M.IntegratedGradients(["mean"], n_steps=4, internal_batch_size=None)(x)["ig_mean"]
    grouped = M.IntegratedGradients(["mean"], n_steps=4, internal_batch_size=1)(x)["ig_mean"]
    torch.testing.assert_close(one, grouped, rtol=1e-4, atol=1e-6)


def test_gradient_shap_against_a_reference_set_of_real_images(cls):
    """With one black reference image SHAP equals the black baseline; the reference is required."""
    x = torch.rand(2, 1, 32, 32)
    base = inputs(cls, x, CLS_SPEC, raw=False)
    black = M.GradientShap(["black"], n_samples=4, stdevs=0.0)(base)["gradient_shap"]
    ref = M.ExplainInputs(base.task, base.images, base.target, None, None, 0, reference=torch.zeros(1, 1, 32, 32))
    refmap = M.GradientShap(["reference"], n_samples=4, stdevs=0.0)(ref)["gradient_shap"]
    assert torch.allclose(black, refmap, atol=1e-6)
    many = M.ExplainInputs(base.task, base.images, base.target, None, None, 0, reference=torch.rand(50, 1, 32, 32))
    assert M.GradientShap(["reference"], n_samples=4)(many)["gradient_shap"].shape == (2, 32, 32)
    with pytest.raises(ValueError, match="need real reference images: set xai.reference"):
        M.GradientShap(["reference"], n_samples=2)(base)
    with pytest.raises(ValueError, match="baselines must be"):
        M.GradientShap(["reference", "gray"])
