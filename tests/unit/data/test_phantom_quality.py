"""The phantom with known acquisition quality and its quality function (the quality loop's ground truth)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medtrust.data.phantoms.multimodal import MODALITIES, PhantomMultimodalSource
from medtrust.data.phantoms.quality import (PhantomQualityRater, check_quality_mix, rating_of, simulate_raters,
                                            wash_out)
from medtrust.data.sources.ratings import krippendorff_alpha

MIX = {"good": 0.4, "fair": 0.3, "poor": 0.3}


@pytest.fixture(scope="module")
def records():
    return PhantomMultimodalSource(n_images=150, size=32, seed=5, quality=MIX).records()


@pytest.fixture(scope="module")
def rater():
    return PhantomQualityRater(list(MODALITIES), size=32, n_reference=12)


def _images(recs):
    return torch.stack([torch.from_numpy(r["image"]).permute(2, 0, 1).float() / 255 for r in recs])


def test_the_quality_function_recovers_every_injected_grade(records, rater):
    q = np.array([r["quality"] for r in records])
    assert set(q.tolist()) == {1, 2, 3} and 0.2 < (q == 1).mean() < 0.45
    assert (rater.rate(_images(records), [r["modality"] for r in records]) == q).all()


def test_quality_never_reaches_the_text_and_keeps_the_anatomy(records):
    clean = PhantomMultimodalSource(n_images=150, size=32, seed=5).records()
    for a, b in zip(records, clean):
        assert a["text"] == b["text"] and a["label"] == b["label"] and np.array_equal(a["mask"], b["mask"])
        if a["quality"] == 1:  # washed out: same mean, lower contrast
            la, lb = a["image"].mean(2), b["image"].mean(2)  # luminance
            assert abs(la.mean() - lb.mean()) < 2 and la.std() < 0.45 * lb.std()
    again = PhantomMultimodalSource(n_images=20, size=32, seed=5, quality=MIX).records()
    assert all(np.array_equal(a["image"], b["image"]) and a["quality"] == b["quality"] for a, b in zip(records, again))


def test_wash_out_and_ratings_by_hand():
    img = np.array([[[0], [200]]], dtype=np.uint8).repeat(3, axis=2)  # 1 x 2 x 3: mean 100
    assert wash_out(img, 0.5)[0, :, 0].tolist() == [50, 150] and np.array_equal(wash_out(img, 0.0), img)
    assert rating_of([0.1, 0.39, 0.4, 0.77, 0.78, 1.2]).tolist() == [1, 1, 2, 2, 3, 3]


def test_simulated_raters_agree_less_as_their_noise_grows():
    c = np.exp(np.random.default_rng(0).uniform(np.log(0.2), np.log(1.1), 400))
    tight = simulate_raters(c, [{"sigma": 0.02}, {"sigma": 0.02}], seed=1).rename(columns={"image": "image"})
    loose = simulate_raters(c, [{"sigma": 0.4}, {"sigma": 0.4}], seed=1)
    a_tight = krippendorff_alpha(tight, n_boot=0)["alpha"]
    a_loose = krippendorff_alpha(loose, n_boot=0)["alpha"]
    assert a_tight > 0.9 > a_loose > 0.2
    exact = simulate_raters(c, [{"sigma": 0.0}], seed=1)
    assert (exact["rating"].to_numpy() == rating_of(c)).all()


def test_bad_quality_settings_are_refused():
    with pytest.raises(ValueError, match="unknown grade"):
        check_quality_mix({"excellent": 1.0})
    with pytest.raises(ValueError, match="sum to 1"):
        check_quality_mix({"good": 0.5, "poor": 0.2})
    with pytest.raises(ValueError, match="not phantom modalities"):
        PhantomQualityRater(["dermoscopy"], size=32)
    with pytest.raises(ValueError, match="no reference for modalities"):
        PhantomQualityRater(["cxr"], size=32, n_reference=2).contrast(torch.rand(1, 3, 32, 32), ["ct"])
