"""data.cache=false: the same samples as the cached split, read from the files when used; bad headers are
skipped or refused at setup, bad pixels are named when read."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medtrust.data.datamodule import ImageDataModule
from medtrust.data.records import DataError
from tests.reliability.matrix import csv_layout, zero_byte


def dm(lay, **kw):
    return ImageDataModule(lay.source(), image_size=16, channels=3, normalize=None, load_threads=1,
                           augment={"hflip": {"enabled": True, "prob": 0.5}}, **kw)


def test_streamed_samples_equal_cached_ones(tmp_path):
    lay = csv_layout(tmp_path / "d")
    cached, streamed = dm(lay), dm(lay, cache=False)
    for split in ("train", "val", "test"):
        a, b = cached.dataset(split), streamed.dataset(split)
        assert len(a) == len(b)
        for i in range(len(a)):
            x, y = a[i], b[i]
            assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"]) and x["path"] == y["path"]
    imgs, masks, _ = streamed.load_split("train")
    assert not isinstance(imgs, list) and torch.equal(imgs[-1], cached.load_split("train")[0][-1])
    assert [m.shape for m in masks[0:2]] == [(1, 16, 16)] * 2
    with pytest.raises(IndexError):
        imgs[len(imgs)]
    # seeded augmentation: the same training batches either way
    ba, bb = next(iter(cached.dataloader("train", train=True))), next(iter(streamed.dataloader("train", train=True)))
    assert torch.equal(ba["image"], bb["image"]) and torch.equal(ba["mask"], bb["mask"])


def test_a_bad_header_is_skipped_at_setup_and_bad_pixels_are_named_when_read(tmp_path):
    lay = csv_layout(tmp_path / "d")
    zero_byte(lay)  # images/x0.png (train)
    with pytest.raises(DataError, match="x0.png"):
        dm(lay, cache=False).load_split("train")
    skip = dm(lay, cache=False, on_bad="skip")
    assert len(skip.load_split("train")[2]) == 1 and len(skip.skipped) == 1
    # a truncated file has a valid header: the stream names it when its pixels are read
    data = lay.images[1].read_bytes()
    lay.images[1].write_bytes(data[: len(data) - 40])
    imgs = dm(lay, cache=False, on_bad="skip").load_split("train")[0]
    with pytest.raises(DataError, match=r"x1.png.*data.cache=false reads pixels when they are used"):
        imgs[0]


def test_mask_size_is_checked_from_the_headers(tmp_path):
    lay = csv_layout(tmp_path / "d")
    from PIL import Image

    Image.fromarray(np.zeros((20, 16), np.uint8)).save(lay.masks[2])
    with pytest.raises(DataError, match="x2.png: mask size 16x20"):
        dm(lay, cache=False).load_split("val")
