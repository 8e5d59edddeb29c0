"""Pixels are read as they are meant (issue 17's "pixels silently corrupted"): 16-bit and float images
rescaled from their own range, palette and colour masks read by index / brightest channel, non-binary
masks and unreadable npz arrays refused with the file named."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medtrust.data.records import DataError, load_record, read_image, read_mask
from medtrust.data.sources.medmnist import MedMnistSource


def _disc(n: int = 32, r: int = 8) -> np.ndarray:
    yy, xx = np.mgrid[:n, :n]
    return ((yy - n / 2) ** 2 + (xx - n / 2) ** 2 < r * r).astype(np.uint8)


def test_a_16_bit_png_keeps_its_contrast(tmp_path):
    ramp = np.tile(np.linspace(1000, 4000, 64).astype(np.uint16), (16, 1))   # 12-bit data in a 16-bit file
    Image.fromarray(ramp).save(tmp_path / "ct.png")
    with Image.open(tmp_path / "ct.png") as im:
        assert im.mode.startswith("I")                                     # really a 16-bit file
    img = read_image(tmp_path / "ct.png", 1)[..., 0]
    assert img.min() == 0 and img.max() == 255                              # not all 255 (PIL's clip)
    assert (np.diff(img[0].astype(int)) >= 0).all() and len(np.unique(img)) > 50   # order and contrast kept
    rgb = read_image(tmp_path / "ct.png", 3)
    assert rgb.shape == (16, 64, 3) and (rgb[..., 0] == img).all() and (rgb[..., 2] == img).all()


def test_a_float_tiff_with_nan_is_refused_naming_it(tmp_path):
    a = np.ones((8, 8), np.float32)
    a[2, 3] = np.nan
    Image.fromarray(a, mode="F").save(tmp_path / "x.tif")
    with pytest.raises(DataError, match=r"x\.tif: 1 NaN/Inf"):
        read_image(tmp_path / "x.tif", 1)


def test_rgba_and_palette_images_read_as_their_colours(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0], rgb[..., 1] = 200, np.arange(8)[None] * 20
    Image.fromarray(np.dstack([rgb, np.full((8, 8), 255, np.uint8)]), "RGBA").save(tmp_path / "a.png")
    assert (read_image(tmp_path / "a.png", 3) == rgb).all()
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=8).save(tmp_path / "p.png")
    assert (read_image(tmp_path / "p.png", 3) == rgb).all()


@pytest.mark.parametrize("kind", ["L 0/255", "L 0/1", "palette", "red RGB", "RGBA", "1-bit"])
def test_every_binary_mask_encoding_gives_the_same_mask(tmp_path, kind):
    disc = _disc()
    path = tmp_path / "m.png"
    if kind == "L 0/255":
        Image.fromarray(disc * 255).save(path)
    elif kind == "L 0/1":
        Image.fromarray(disc).save(path)
    elif kind == "palette":                          # index 0 black, index 1 dark red: luminance 38 < 127
        im = Image.fromarray(disc, "P")
        im.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)
        im.save(path)
    elif kind == "red RGB":                          # luminance of pure red is 76: PIL's "L" made it empty
        Image.fromarray(np.dstack([disc * 255, disc * 0, disc * 0]).astype(np.uint8)).save(path)
    elif kind == "RGBA":
        Image.fromarray(np.dstack([disc * 255] * 3 + [np.full_like(disc, 255)]).astype(np.uint8), "RGBA").save(path)
    else:
        Image.fromarray(disc.astype(bool)).save(path)
    assert (read_mask(path) == disc).all()


def test_a_mask_with_other_values_is_refused_naming_file_and_values(tmp_path):
    m = _disc() * 255
    m[0, :4] = 128
    Image.fromarray(m.astype(np.uint8)).save(tmp_path / "soft_mask.png")
    with pytest.raises(DataError, match=r"soft_mask\.png: mask values \[0, 128, 255\]; expected a binary mask"):
        read_mask(tmp_path / "soft_mask.png")
    rec = {"id": "a", "path": "mem", "image": np.zeros((32, 32, 1), np.uint8), "mask": m.astype(np.uint8)}
    with pytest.raises(DataError, match="mask of mem: mask values"):
        load_record(rec, (32, 32), 1, require_mask=True)


def _npz(path, images, labels=None):
    n = len(images)
    labels = np.zeros((n, 1), np.int64) if labels is None else labels
    np.savez(path, train_images=images, train_labels=labels)
    return path


def test_a_uint16_npz_is_rescaled_not_wrapped(tmp_path):
    imgs = np.tile(np.linspace(0, 1000, 28).astype(np.uint16), (2, 28, 1))   # 256 would wrap to 0
    recs = MedMnistSource(str(_npz(tmp_path / "u16.npz", imgs)), splits=("train",)).records()
    row = recs[0]["image"][0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and (np.diff(row) >= 0).all()


def test_an_npz_object_array_is_refused_naming_file_and_key(tmp_path):
    imgs = np.empty(2, dtype=object)
    imgs[0], imgs[1] = np.zeros((28, 28)), np.zeros((28, 28))
    path = tmp_path / "obj.npz"
    np.savez(path, train_images=imgs, train_labels=np.zeros((2, 1), np.int64))
    with pytest.raises(DataError, match=r"obj\.npz: 'train_images'/'train_labels' cannot be read without pickle"):
        MedMnistSource(str(path), splits=("train",)).records()


def test_a_decompression_bomb_header_is_a_data_error_naming_the_file(tmp_path):
    import struct
    import zlib

    path = tmp_path / "bomb.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(path)
    raw = bytearray(path.read_bytes())
    ihdr = raw[12:29]                                   # b"IHDR" + 13 bytes of header
    ihdr[4:12] = struct.pack(">II", 20000, 20000)       # claims 20000 x 20000 pixels
    raw[12:29] = ihdr
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"bomb\.png .*DecompressionBombError"):
        read_image(path, 1)
