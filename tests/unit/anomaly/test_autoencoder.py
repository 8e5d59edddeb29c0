"""SAFEGEN's autoencoder baseline: the task contract, its reconstruction and what it refuses."""
from __future__ import annotations

import pytest
import torch

from medtrust.nets.anomaly import conv_autoencoder
from medtrust.tasks.anomaly import AutoencoderAnomalyTask


def _task(**kw):
    return AutoencoderAnomalyTask(conv_autoencoder(1, [8, 16], [2, 2], latent_channels=4), torch.nn.L1Loss(),
                                  optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), **kw)


def test_forward_is_the_residual_and_the_reconstruction_costs_one_evaluation():
    torch.manual_seed(0)
    task = _task()
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    rec, info = task.reconstruct(x)
    assert rec.shape == x.shape and info["evaluations_per_image"] == 1
    assert torch.allclose(task(x), x - rec, atol=1e-6)
    res, _ = task.residuals(x)
    assert res.shape == (3, 32, 32) and (res >= 0).all()
    assert task.embeddings(x).shape == (3, 4 * 8 * 8)  # the bottleneck code
    assert task.reconstruction_summary() == {"detector": "autoencoder", "sigma": 1.0, "mode": "autoencoder"}


def test_training_lowers_the_reconstruction_error():
    torch.manual_seed(0)
    task = _task()
    x = torch.rand(8, 1, 32, 32) * 2 - 1
    opt = torch.optim.Adam(task.parameters(), lr=1e-2)
    before = float(task.loss(task.net(x), x))
    for _ in range(30):
        opt.zero_grad()
        loss = task.training_step({"image": x}, 0)
        loss.backward()
        opt.step()
    assert float(task.loss(task.net(x), x)) < 0.7 * before


def test_bad_keys_are_named():
    with pytest.raises(ValueError, match=r"model.reconstruction: unknown key\(s\) \['t0'\]"):
        _task(reconstruction={"t0": 100})
    task = _task()
    with pytest.raises(ValueError, match=r"evaluation.reconstruction: unknown key\(s\) \['k'\]"):
        task.use_evaluation_reconstruction({"reconstruction": {"k": 3, "sigma": None}})
    task.use_evaluation_reconstruction({"reconstruction": {"sigma": 0.0, "mode": None}})
    assert task.recon_cfg["sigma"] == 0.0
    with pytest.raises(ValueError, match="same length"):
        conv_autoencoder(1, [8, 16], [2])


def test_the_input_check_names_the_trained_channels_and_the_fitted_size():
    from medtrust.anomaly.scoring import AnomalyStats

    task = _task()
    task.check_input(torch.zeros(1, 1, 24, 24), "x")  # no statistics yet: any size
    task.stats = AnomalyStats.fit(torch.rand(30, 32, 32), min_images=20)
    with pytest.raises(ValueError, match=r"images of 3 channel\(s\) at \(32, 32\), the detector was trained on 1"):
        task.check_input(torch.zeros(1, 3, 32, 32), "benchmark images")
    with pytest.raises(ValueError, match=r"fitted at \(32, 32\)"):
        task.check_input(torch.zeros(1, 1, 16, 16), "benchmark images")
