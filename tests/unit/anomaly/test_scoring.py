"""Residual z-scoring against clean real images, thresholds from clean images, the saved statistics."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medtrust.anomaly.scoring import (AnomalyStats, TooFewImagesError, residual, threshold_at_flag_rate,
                                      top_k_mean)


def _clean(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # a residual whose scale varies over the image (edges reconstruct worse than the centre)
    scale = torch.linspace(0.02, 0.2, 16).repeat(16, 1)
    return (torch.randn(n, 16, 16, generator=g) * scale + 3 * scale).abs()


def test_per_pixel_z_scores_of_clean_images_are_standard_and_an_artifact_stands_out():
    stats = AnomalyStats.fit(_clean(400), min_images=50, top_k_percent=2.0)
    z = stats.zscore(_clean(400, seed=1))
    assert abs(float(z.mean())) < 0.1 and abs(float(z.std()) - 1) < 0.1
    # the same raw residual is unusual where clean residuals are small, usual where they are large
    bump = _clean(2, seed=2)
    bump[0, 5:8, 0:3] += 0.15  # low-residual columns
    bump[1, 5:8, 13:16] += 0.15  # high-residual columns
    s = stats.image_scores(bump)
    assert s[0] > stats.image_threshold and s[0] > s[1]


def test_the_image_threshold_flags_at_most_the_configured_share_of_clean_images():
    stats = AnomalyStats.fit(_clean(200), min_images=50, max_flag_rate=0.05)
    flagged = (stats.image_scores(_clean(200)) > stats.image_threshold).float().mean()
    assert flagged <= 0.05  # on the images it was fitted on (in-sample, by construction)
    assert threshold_at_flag_rate(np.arange(100), 0.05, 10) == 94  # 95..99 above: 5 of 100
    assert threshold_at_flag_rate(np.arange(100), 0.0, 10) == 99
    assert set(stats.score_percentiles) == {"p50", "p90", "p95", "p99", "p99.9"} and stats.n_images == 200


def test_too_few_clean_images_are_refused():
    with pytest.raises(TooFewImagesError, match="from 20 clean real images: at least 50"):
        AnomalyStats.fit(_clean(20), min_images=50)
    with pytest.raises(TooFewImagesError, match="from 9 clean image scores: at least 10"):
        threshold_at_flag_rate(np.arange(9), 0.05, 10)


def test_residuals_refuse_nan_and_smooth_on_request():
    x = torch.zeros(3, 1, 8, 8)
    r = x.clone()
    r[1, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or Inf residuals in 1 of 3 images \(images \[1\]"):
        residual(x, r)
    r = x.clone()
    r[0, 0, 4, 4] = 1.0
    raw, smooth = residual(x, r), residual(x, r, sigma=1.0)
    assert raw[0, 4, 4] == 1 and 0 < smooth[0, 4, 4] < 1 and smooth[0].sum() == pytest.approx(1.0, abs=1e-3)
    assert top_k_mean(torch.arange(100.0).view(1, 10, 10), 5).item() == pytest.approx(97.0)


def test_stats_round_trip_and_are_never_overwritten(tmp_path):
    stats = AnomalyStats.fit(_clean(60), min_images=50, fitted_on="val")
    path = stats.save(tmp_path / "anomaly_stats.pt")
    back = AnomalyStats.load(path)
    assert torch.equal(back.mean, stats.mean) and back.image_threshold == stats.image_threshold
    assert back.fitted_on == "val" and back.pixel_percentiles == stats.pixel_percentiles
    with pytest.raises(FileExistsError, match="never overwritten"):
        stats.save(path)
    (tmp_path / "bad.pt").write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="bad.pt: not a readable anomaly_stats.pt"):
        AnomalyStats.load(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="residual maps of size"):
        back.zscore(torch.zeros(1, 8, 8))


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def test_a_stats_file_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"mean": _Payload()}, tmp_path / "anomaly_stats.pt")
    with pytest.raises(ValueError, match="not a readable anomaly_stats.pt"):
        AnomalyStats.load(tmp_path / "anomaly_stats.pt")
    assert not (tmp_path / "pwned").exists()


def test_the_contrastive_score_is_the_distance_to_the_nearest_clean_references_and_fuses(tmp_path):
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(100, 8, generator=g)
    stats = AnomalyStats.fit(_clean(60), min_images=50)
    stats.fit_reference(ref, k=3)
    near, far = torch.randn(20, 8, generator=g), torch.randn(20, 8, generator=g) + 4
    kn, kf = stats.knn_scores(near), stats.knn_scores(far)
    assert kf.min() > kn.max()
    assert abs(float(kn.mean()) - stats.knn_mean) < 0.3 * stats.knn_mean  # references scored like new clean images
    one = stats.knn_scores(ref[:1] + 1e-3)
    assert torch.allclose(one, torch.cdist(ref[:1], ref).sort().values[0, :3].mean(), atol=1e-2)
    f = stats.fused(torch.full((20,), stats.score_mean), kf)
    assert torch.allclose(f, (kf - stats.knn_mean) / stats.knn_std)
    back = AnomalyStats.load(stats.save(tmp_path / "anomaly_stats.pt"))
    assert torch.equal(back.knn_scores(far), kf)
    with pytest.raises(TooFewImagesError, match="at least 4 are needed"):
        stats.fit_reference(ref[:3], k=3)
