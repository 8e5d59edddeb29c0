"""OOD helpers on known truth: the shrunk Mahalanobis precision, and the up-front check of an OOD set's files."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.covariance import LedoitWolf

from medtrust.evaluation.ood import check_readable, shrunk_mahalanobis
from medtrust.evaluation.shift import check_spec


def test_precision_is_ledoit_wolf_inverse_with_fewer_images_than_features():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 128, generator=g), torch.arange(60) % 2
    det = shrunk_mahalanobis(x, y)
    z = x.double()
    centred = torch.cat([z[y == k] - z[y == k].mean(0) for k in (0, 1)]).numpy()
    want = LedoitWolf(assume_centered=True).fit(centred).precision_
    np.testing.assert_allclose(det.precision.double().numpy(), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_zero_shrinkage_singular_covariance_falls_back_to_the_pseudo_inverse():
    # every image identical within its class: the centred features are all zero, the covariance singular
    x = torch.cat([torch.zeros(5, 8), torch.ones(5, 8)])
    det = shrunk_mahalanobis(x, torch.tensor([0] * 5 + [1] * 5))
    assert torch.isfinite(det.precision).all()


def _set(tmp_path):
    good = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(good)
    bad = tmp_path / "b.png"
    bad.write_bytes(b"not a png")
    return good, bad


def test_an_unreadable_file_is_named_or_skipped(tmp_path):
    good, bad = _set(tmp_path)
    with pytest.raises(ValueError, match=r"ood.sets\[0\]: .*b.png is unreadable"):
        check_readable([good, bad], "ood.sets[0]")
    assert check_readable([good, bad], "ood.sets[0]", on_bad="skip") == [good]
    with pytest.raises(ValueError, match="none of its 1 file"):
        check_readable([bad], "ood.sets[0]", on_bad="skip")


@pytest.mark.parametrize("spec,msg", [
    ({"corruptions": {"gaussian_noise": [0.1, 0.2, 0.3, 0.4, 0.5]}, "only": ["fog"]}, "shift.only: ['fog'] not in"),
    ({"corruptions": {"gaussian_noise": {"sd": [0.1, 0.2]}}}, "shift.corruptions.gaussian_noise: expected 5 severity"),
    ({"corruptions": {"gaussian_noise": [0.1, 0.2, 0.3, 0.4, 0.5]}, "severities": [0]}, "shift.severities must be"),
    ({"prevalence": [0.5, 1.0]}, "shift.prevalence ratios must lie in (0, 1)"),
])
def test_shift_spec_is_checked_without_images(spec, msg):
    with pytest.raises(ValueError, match=re.escape(msg)):
        check_spec(spec)
