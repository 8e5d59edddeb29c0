"""Phantom dermoscopy data: seeded, exact masks, varied, patient structure."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import binary_dilation

from medtrust.data.phantoms.derm import PhantomDermSource, render_derm


def test_image_i_depends_only_on_seed_and_index():
    a = PhantomDermSource(n_images=5, size=48, seed=2).records()
    b = PhantomDermSource(n_images=9, size=48, seed=2).records()
    for x, y in zip(a, b):
        assert np.array_equal(x["image"], y["image"]) and np.array_equal(x["mask"], y["mask"])
    c = PhantomDermSource(n_images=5, size=48, seed=3).records()
    assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_masks_are_exact_binary_and_lesion_is_darker_than_skin():
    for i in range(40):
        img, mask, info = render_derm(0, i, 64)
        assert img.dtype == np.uint8 and img.shape == (64, 64, 3)
        assert set(np.unique(mask)) <= {0, 1} and 0.005 < mask.mean() < 0.8
        grey = img.mean(-1)
        ring = binary_dilation(mask, iterations=4) & ~binary_dilation(mask, iterations=1)
        inside, around = np.median(grey[mask == 1]), np.median(grey[ring])
        assert inside < around  # lesions are pigmented on every skin tone


def test_features_vary_and_patients_group_images():
    recs = PhantomDermSource(n_images=200, size=32, seed=0).records()
    tones = {r["attrs"]["skin_tone"] for r in recs}
    assert len(tones) >= 5
    sizes = [r["mask"].mean() for r in recs]
    assert np.std(sizes) > 0.02
    pids = [r["patient_id"] for r in recs]
    assert len(set(pids)) < len(pids)  # some patients have several images
    for pid in set(pids):
        assert len({r["attrs"]["skin_tone"] for r in recs if r["patient_id"] == pid}) == 1
    info = [render_derm(0, i, 32)[2] for i in range(100)]
    assert any(x["n_hair"] for x in info) and any(x["ruler"] for x in info) and any(x["vignette"] for x in info)
    assert any(x["multicolour"] for x in info)


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="n_images"):
        PhantomDermSource(n_images=0)
    with pytest.raises(ValueError, match="skin_tone_probs: unknown groups"):
        PhantomDermSource(skin_tone_probs={"VII": 1.0})
