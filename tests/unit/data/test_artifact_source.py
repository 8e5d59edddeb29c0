"""Real against synthetic: a source with SAFEGEN's artifacts injected into a share of its images, and SHAP's
reference set of real images."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medtrust.data.datamodule import ImageDataModule
from medtrust.data.phantoms.cxr import PhantomCxrSource
from medtrust.data.sources.artifacts import ArtifactSource
from medtrust.xai.pipeline import reference_images


def _src(**kw):
    return ArtifactSource(PhantomCxrSource(n_images=60, size=32, seed=1), image_size=[32, 32], channels=1, **kw)


def test_a_share_of_images_carries_one_artifact_whose_mask_holds_every_changed_pixel():
    recs, inner = _src(fraction=0.5).records(), PhantomCxrSource(n_images=60, size=32, seed=1).records()
    labels = np.array([r["label"] for r in recs])
    assert 0.3 < labels.mean() < 0.7 and len(recs) == 60
    for r, o in zip(recs, inner):
        assert r["id"] == o["id"] and r["patient_id"] == o["patient_id"]   # splits stay patient-disjoint
        changed = r["image"][..., 0] != o["image"]
        if r["label"] == 0:
            assert not changed.any() and not r["mask"].any() and r["attrs"]["cohort"] == "real"
        else:
            assert changed.any() and not (changed & ~r["mask"].astype(bool)).any()   # exact: nothing outside
            assert r["attrs"]["cohort"] in ("displaced", "noise", "extreme", "subtle")
            assert 1 <= int(r["attrs"]["severity"]) <= 5
    again = _src(fraction=0.5).records()
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(recs, again))   # reproducible from the seed
    other = _src(fraction=0.5, seed=3).records()
    assert any(not np.array_equal(a["image"], b["image"]) for a, b in zip(recs, other))


def test_only_the_chosen_cohorts_and_severities_are_injected():
    recs = _src(fraction=0.9, cohorts=["extreme"], severities=[5]).records()
    inj = [r for r in recs if r["label"] == 1]
    assert inj and {r["attrs"]["cohort"] for r in inj} == {"extreme"} and {r["attrs"]["severity"] for r in inj} == {"5"}


@pytest.mark.parametrize("kw, msg", [({"fraction": 1.0}, "fraction"), ({"cohorts": ["blur"]}, "cohorts"),
                                     ({"severities": [0, 6]}, "severities")])
def test_bad_settings_are_named(kw, msg):
    with pytest.raises(ValueError, match=f"data.source.{msg}"):
        _src(**kw)


def test_the_reference_set_is_the_real_images_of_a_split_capped_and_normalised():
    dm = ImageDataModule(_src(fraction=0.5), image_size=[32, 32], channels=1, require_label=True, num_classes=2,
                         normalize={"mean": [0.5], "std": [0.5]})
    dm.setup()
    imgs, _, recs = dm.load_split("train")
    real = [i for i, r in enumerate(recs) if r["label"] == 0]
    ref, info = reference_images(dm, {"split": "train", "n": 1000, "label": 0})
    assert info["n"] == len(real) == info["n_available"] and ref.shape == (len(real), 1, 32, 32)
    assert torch.allclose(ref[0], imgs[real[0]].float().div(255) * 2 - 1)
    few, info = reference_images(dm, {"split": "train", "n": 3, "label": 0})
    assert len(few) == 3 and info["n_requested"] == 3 and info["n_available"] == len(real)
    assert reference_images(dm, None) == (None, {})
    with pytest.raises(ValueError, match="xai.reference: unknown key"):
        reference_images(dm, {"count": 3})
    with pytest.raises(ValueError, match="no image of split 'train' with label 7"):
        reference_images(dm, {"split": "train", "label": 7})


def test_inner_files_outside_the_data_root_are_refused_unless_allowed(tmp_path):
    """The artifact source reads its inner source's files itself: the same data-root rule as the datamodule."""
    from medtrust.data.records import DataError
    from tests.reliability.matrix import csv_layout, dotdot

    lay = csv_layout(tmp_path / "d")
    dotdot(lay)  # row 2 now points to ../d_outside/images/x0.png
    with pytest.raises(DataError, match=r"manifest.csv row 2: image .* outside the data root"):
        ArtifactSource(lay.source(), image_size=[16, 16], channels=1).records()
    recs = ArtifactSource(lay.source(), image_size=[16, 16], channels=1, allow_outside_root=True).records()
    assert len(recs) == 6
