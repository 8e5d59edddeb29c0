"""Segmentation training augmentations (augment=standard) keep image and mask aligned up to a 2-px boundary band."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from scipy import ndimage

from medtrust.data.datamodule import CachedImageDataset
from medtrust.data.transforms import AUGMENTATIONS, GEOMETRIC, build_transforms, denormalize
from medtrust.runs.resolvers import PROJECT_ROOT

# What segmentation data configs (isic2018, phantom_derm, csv, folder) train with: `augment: standard`,
# normalised with _image_defaults' mean/std; ImageDataModule builds its training pipeline as
# build_transforms(augment, channels, normalize, train=True, with_mask=True, seed=data.seed).
STANDARD = OmegaConf.to_container(OmegaConf.load(PROJECT_ROOT / "conf/data/augment/standard.yaml"))
NORMALIZE = OmegaConf.to_container(OmegaConf.load(PROJECT_ROOT / "conf/data/_image_defaults.yaml").normalize)
# The geometric toggles of that config, each forced on (prob 1) with its configured bounds, the rest off.
GEOMETRY = {name: {**block, "enabled": name in GEOMETRIC, "prob": 1.0} for name, block in STANDARD.items()}

# Tolerance. The mask is resampled with nearest neighbour and the image bilinearly (zero padding for both).
# At one sample point the two thresholded values can differ only where the bilinear 2x2 footprint straddles
# an edge, i.e. on pixels at most 1 px from the mask's boundary. Rotation and zoom are two resamplings in a
# row, so the band is 2 px (Chebyshev); measured worst case over 300 random scenes: exactly 2 px. The frame
# counts as boundary since the padding is background. Inside the band at most half of the boundary ring may
# disagree (measured at most ~0.3): a systematic shift of the mask against the image would flip far more.
BAND_PX = 2
MAX_FLIPPED_PER_RING_PIXEL = 0.5


def distance_to_other_class(mask: np.ndarray) -> np.ndarray:
    """Chebyshev distance of each pixel to the nearest pixel of the other class (outside the frame is
    background); infinite everywhere for an empty mask."""
    padded = np.pad(mask, 1)
    if not padded.any():
        return np.full(mask.shape, np.inf)
    inside = ndimage.distance_transform_cdt(padded, metric="chessboard")
    outside = ndimage.distance_transform_cdt(~padded, metric="chessboard")
    return np.where(padded, inside, outside)[1:-1, 1:-1].astype(float)


def assert_aligned(image: torch.Tensor, mask: torch.Tensor) -> None:
    """``image`` C×H×W in [0, 1] was the mask in every channel before the transform; ``mask`` 1×H×W."""
    assert image.shape[1:] == mask.shape[1:], (image.shape, mask.shape)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}, "nearest-neighbour masks stay binary"
    truth = mask[0].numpy() > 0.5
    wrong = ((image.numpy() >= 0.5) != truth[None]).any(0)  # any channel thresholded to the other class
    dist = distance_to_other_class(truth)
    far = dist[wrong]
    assert far.size == 0 or far.max() <= BAND_PX, f"image and mask disagree {far.max()} px from the mask boundary"
    ring = int((dist == 1).sum())
    assert wrong.sum() <= MAX_FLIPPED_PER_RING_PIXEL * ring, f"{int(wrong.sum())} flipped pixels for a ring of {ring}"


@st.composite
def masks(draw) -> np.ndarray:
    """An H×W boolean mask: a union of 0-3 random ellipses and rectangles (possibly empty, cut by the frame
    or thinner than a pixel)."""
    h, w = draw(st.integers(8, 48)), draw(st.integers(8, 48))
    yy, xx = np.mgrid[0:h, 0:w]
    mask = np.zeros((h, w), bool)
    unit, radius = st.floats(0, 1), st.floats(0.03, 0.5)
    shape = st.tuples(st.sampled_from(["ellipse", "rect"]), unit, unit, radius, radius)
    for kind, cy, cx, ry, rx in draw(st.lists(shape, max_size=3)):
        dy, dx = (yy - cy * h) / (ry * h), (xx - cx * w) / (rx * w)
        mask |= (dy**2 + dx**2 <= 1) if kind == "ellipse" else ((abs(dy) <= 1) & (abs(dx) <= 1))
    return mask


def encoded(mask: np.ndarray, channels: int) -> dict[str, torch.Tensor]:
    """A sample whose image *is* its mask, in every channel, so alignment can be read back from the image."""
    m = torch.from_numpy(mask[None].astype(np.float32))
    return {"image": m.repeat(channels, 1, 1), "mask": m.clone()}


SEEDS = st.integers(0, 2**31 - 1)


def test_the_standard_config_enables_every_geometric_augmentation():
    """Guards the tests below against vacuity: the geometry they exercise is what training uses, and the
    mask-moving toggles are exactly the flips, rotation and zoom (no elastic deformation or crops)."""
    assert set(GEOMETRIC) == {"hflip", "vflip", "rotation", "zoom"} and set(GEOMETRIC) <= set(AUGMENTATIONS)
    assert all(STANDARD[name]["enabled"] for name in GEOMETRIC)


@settings(max_examples=30)
@given(st.lists(masks(), min_size=1, max_size=3), SEEDS, st.sampled_from([1, 3]))
def test_geometric_augmentations_move_image_and_mask_together(scenes, seed, channels):
    """Every geometric toggle on (prob 1), several samples through one pipeline (its random stream advances)."""
    pipe = build_transforms(GEOMETRY, channels, None, train=True, with_mask=True, seed=seed)
    for mask in scenes:
        out = pipe(encoded(mask, channels))
        assert_aligned(out["image"], out["mask"])


@settings(max_examples=30)
@given(st.lists(masks(), min_size=1, max_size=3), SEEDS)
def test_training_samples_keep_image_and_mask_aligned(scenes, seed):
    """The whole standard pipeline as configured (photometric toggles and probabilities included, then
    normalisation) through the dataset the datamodule uses, on uint8 images as cached from disk."""
    images = [torch.from_numpy(np.repeat(m[None], 3, 0).astype(np.uint8) * 255) for m in scenes]
    masks_u8 = [torch.from_numpy(m[None].astype(np.uint8)) for m in scenes]
    records = [{"id": f"img{i}", "patient_id": f"p{i}"} for i in range(len(scenes))]
    tf = build_transforms(STANDARD, 3, NORMALIZE, train=True, with_mask=True, seed=seed)
    ds = CachedImageDataset(images, masks_u8, records, tf)
    for i in range(len(ds)):
        sample = ds[i]
        assert_aligned(denormalize(sample["image"], NORMALIZE), sample["mask"])


@pytest.mark.parametrize("name", sorted(GEOMETRIC))
def test_each_geometric_toggle_moves_the_mask_without_a_systematic_offset(name):
    """Non-vacuity and no half-pixel drift: alone (prob 1, configured bounds), each toggle changes an
    asymmetric mask for at least 15 of 20 seeds (else the tests above would pass on an identity), and over the
    20 seeds at most 8 % of the boundary-ring pixels disagree. Measured: flips 0 %, rotation ~1.5 %, zoom ~3 %;
    zoom with torch's "nearest" for the mask (half a pixel off "bilinear", which the product avoids with
    "nearest-exact") ~17 %."""
    yy, xx = np.mgrid[0:40, 0:48]
    mask = ((yy - 12) ** 2 / 49 + (xx - 14) ** 2 / 100 <= 1) | ((yy > 26) & (xx > 30) & (xx < 40))
    only = {n: {**block, "enabled": n == name, "prob": 1.0} for n, block in STANDARD.items()}
    moved = flipped = ring = 0
    for seed in range(20):
        out = build_transforms(only, 1, None, train=True, seed=seed)(encoded(mask, 1))
        assert_aligned(out["image"], out["mask"])
        truth = out["mask"][0].numpy() > 0.5
        moved += not np.array_equal(truth, mask)
        flipped += int(((out["image"][0].numpy() >= 0.5) != truth).sum())
        ring += int((distance_to_other_class(truth) == 1).sum())
    assert moved >= 15  # a rotation by a fraction of a degree may leave a 40x48 mask unchanged
    assert flipped <= 0.08 * ring, (flipped, ring)
