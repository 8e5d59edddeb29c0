"""The MedMNIST-C corruptions re-implemented in medtrust/data/corruptions.py."""
from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from medtrust.data.corruptions import CORRUPTIONS, check_table, corrupt
from medtrust.runs.resolvers import PROJECT_ROOT

TABLE = check_table(OmegaConf.to_container(OmegaConf.load(PROJECT_ROOT / "conf" / "shift" / "corruptions.yaml"))["corruptions"])


def _image(channels: int = 1) -> np.ndarray:
    yy, xx = np.mgrid[:48, :48]
    g = (40 + 150 * np.exp(-((yy - 24) ** 2 + (xx - 20) ** 2) / 120) + 30 * (xx % 8 < 4)).astype(np.uint8)
    return np.repeat(g[..., None], channels, -1)


def test_every_configured_corruption_is_known_and_has_five_severities():
    assert set(TABLE) == set(CORRUPTIONS) and all(len(v) == 5 for v in TABLE.values())


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
@pytest.mark.parametrize("channels", [1, 3])
def test_damage_grows_with_severity_and_shape_is_kept(name, channels):
    img = _image(channels)
    out = [corrupt(img, name, TABLE[name][s], seed=0) for s in range(5)]
    assert all(o.shape == img.shape and o.dtype == np.uint8 for o in out)
    err = [np.abs(o.astype(float) - img).mean() for o in out]
    assert err[0] > 0 and err[4] > err[0]                       # every corruption changes the image, more at 5
    assert np.array_equal(corrupt(img, name, TABLE[name][2], seed=3), corrupt(img, name, TABLE[name][2], seed=3))


def test_definitions():
    img = _image()
    assert np.array_equal(corrupt(img, "gamma_corr_up", 1.0, 0), img)             # gamma 1 = identity
    dark = corrupt(img, "brightness_down", 0.5, 0).astype(float)
    assert np.allclose(dark, img * 0.5, atol=1)                                    # PIL brightness multiplies
    salt = corrupt(np.full((100, 100, 1), 128, np.uint8), "impulse_noise", 0.1, 0)
    assert abs(np.isin(salt, (0, 255)).mean() - 0.1) < 0.02


def test_bad_tables_are_refused():
    with pytest.raises(ValueError, match=r"shift.corruptions.fog: unknown corruption"):
        check_table({"fog": [1, 2, 3, 4, 5]})
    with pytest.raises(ValueError, match=r"shift.corruptions.gaussian_noise: expected 5 severity parameters"):
        check_table({"gaussian_noise": [0.1, 0.2]})
