"""Augmentations: alignment of image and mask, every toggle does something, bad bounds are refused."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from medtrust.data.transforms import AUGMENTATIONS, GEOMETRIC, build_transforms, denormalize
from medtrust.runs.resolvers import PROJECT_ROOT

FULL = OmegaConf.to_container(OmegaConf.load(PROJECT_ROOT / "conf/data/augment/full.yaml"))


def only(name: str, **changes) -> dict:
    block = copy.deepcopy(FULL[name])
    block.update(enabled=True, prob=1.0, **changes)
    return {name: block}


def encoded_sample(h: int = 48, w: int = 64) -> dict[str, torch.Tensor]:
    """Image whose every channel equals the mask (a blob), so alignment can be read back exactly."""
    yy, xx = np.mgrid[0:h, 0:w]
    mask = ((yy - 20) ** 2 / 100 + (xx - 25) ** 2 / 225 <= 1) | ((yy > 30) & (xx > 45) & (xx < 55))
    img = np.repeat(mask[None].astype(np.float32), 3, 0)
    return {"image": torch.tensor(img), "mask": torch.tensor(mask[None].astype(np.float32))}


def test_all_fifteen_augmentations_are_configured():
    assert len(AUGMENTATIONS) == 15
    assert set(FULL) == set(AUGMENTATIONS)


@pytest.mark.parametrize("name", ["hflip", "vflip"])
def test_flips_keep_image_and_mask_aligned_pixel_exactly(name):
    d = encoded_sample()
    out = build_transforms(only(name), 3, None, train=True, seed=0)(d)
    assert torch.equal(out["image"][0], out["mask"][0])
    axis = -1 if name == "hflip" else -2
    assert torch.equal(out["mask"], torch.flip(d["mask"], dims=[axis]))


@pytest.mark.parametrize("name,changes", [("rotation", {"degrees": [25, 25]}), ("rotation", {"degrees": [-40, -40]}),
                                          ("zoom", {"factors": [1.2, 1.2]}), ("zoom", {"factors": [0.8, 0.8]})])
def test_rotation_and_zoom_keep_alignment_within_tolerance(name, changes):
    d = encoded_sample()
    out = build_transforms(only(name, **changes), 3, None, train=True, seed=0)(d)
    img_mask = out["image"][0] >= 0.5
    mask = out["mask"][0] > 0.5
    assert not torch.equal(mask, d["mask"][0] > 0.5), "the transform did nothing"
    inter = (img_mask & mask).sum().item()
    union = (img_mask | mask).sum().item()
    assert inter / union >= 0.95  # bilinear image vs nearest mask differ only on boundary pixels
    assert set(out["mask"].unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("name", AUGMENTATIONS)
def test_each_toggle_changes_the_image_and_photometric_ones_leave_the_mask(name):
    torch.manual_seed(0)
    d = {"image": torch.rand(3, 32, 32) * 0.6 + 0.2, "mask": (torch.rand(1, 32, 32) > 0.7).float()}
    out = build_transforms(only(name), 3, None, train=True, seed=1)(dict(d))
    assert (out["image"] - d["image"]).abs().max() > 1e-4, f"{name} did not change the image"
    if name not in GEOMETRIC:
        assert torch.equal(out["mask"], d["mask"])
    assert out["image"].min() >= 0 and out["image"].max() <= 1


def test_disabled_toggles_do_nothing_and_eval_pipeline_only_normalises():
    d = {"image": torch.rand(3, 16, 16), "mask": torch.zeros(1, 16, 16)}
    off = {k: {**v, "enabled": False} for k, v in FULL.items()}
    out = build_transforms(off, 3, None, train=True)(dict(d))
    assert torch.allclose(out["image"], d["image"])
    norm = {"mean": [0.5] * 3, "std": [0.25] * 3}
    out = build_transforms(FULL, 3, norm, train=False)({k: v.clone() for k, v in d.items()})
    assert torch.allclose(denormalize(out["image"], norm), d["image"], atol=1e-6)


def test_same_seed_gives_same_augmentation_stream():
    d = {"image": torch.rand(3, 16, 16), "mask": torch.zeros(1, 16, 16)}
    a = build_transforms(FULL, 3, None, train=True, seed=7)
    b = build_transforms(FULL, 3, None, train=True, seed=7)
    for _ in range(3):
        assert torch.equal(a(dict(d))["image"], b(dict(d))["image"])


@pytest.mark.parametrize("aug,msg", [
    ({"rotation": {"enabled": True, "prob": 1.0, "degrees": [30, -30]}}, "data.augment.rotation.degrees"),
    ({"zoom": {"enabled": True, "prob": 1.0, "factors": [0.0, 1.2]}}, "data.augment.zoom.factors"),
    ({"hue": {"enabled": True, "prob": 1.0, "shifts": [-0.1, 0.7]}}, "data.augment.hue.shifts"),
    ({"gamma": {"enabled": True, "prob": 2.0, "gamma": [0.8, 1.2]}}, "data.augment.gamma.prob"),
    ({"sharpen": {"enabled": True}}, "unknown augmentation"),
])
def test_bad_bounds_are_refused_with_the_key(aug, msg):
    with pytest.raises(ValueError, match=msg.replace(".", r"\.")):
        build_transforms(aug, 3, None, train=True)


def test_colour_augmentations_refuse_grayscale():
    with pytest.raises(ValueError, match="data.augment.hue needs RGB"):
        build_transforms(only("hue"), 1, None, train=True)


def test_normalize_length_is_checked():
    with pytest.raises(ValueError, match="data.normalize"):
        build_transforms(None, 3, {"mean": [0.5], "std": [0.2]}, train=False)
