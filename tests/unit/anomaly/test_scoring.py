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
    with pytest.raises(ValueError, match="residual maps of shape"):
        back.zscore(torch.zeros(1, 8, 8))


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def test_a_stats_file_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"mean": _Payload()}, tmp_path / "anomaly_stats.pt")
    with pytest.raises(ValueError, match="anomaly_stats.pt: refused: this anomaly_stats.pt holds Python objects"):
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


def test_the_excess_score_grows_with_extent_where_the_top_k_mean_saturates_and_round_trips(tmp_path):
    g = torch.Generator().manual_seed(0)
    clean = (torch.randn(200, 16, 16, generator=g) * 0.05 + 0.2).abs()  # the same scale everywhere
    top = AnomalyStats.fit(clean, min_images=50, top_k_percent=2.0)
    exc = AnomalyStats.fit(clean, min_images=50, image_score="excess", excess_z=3.0)
    two = clean[:2].clone()
    two[0, 6:9, 6:9] += 1.0          # 9 strong pixels (more than the top 2 % = 6 pixels)
    two[1, 4:11, 4:11] += 1.0        # 49 equally strong pixels
    t, e = top.image_scores(two), exc.image_scores(two)
    assert abs(float(t[1] - t[0])) < 0.1 * float(t[0])  # top-k: about the same for 9 or 49 anomalous pixels
    assert float(e[1]) > 3 * float(e[0]) > 0              # excess: grows with the extent
    assert (exc.image_scores(clean) > exc.image_threshold).float().mean() <= 0.05
    back = AnomalyStats.load(exc.save(tmp_path / "s.pt"))
    assert back.image_score == "excess" and back.excess_z == 3.0 and torch.equal(back.image_scores(two), e)
    with pytest.raises(ValueError, match="image_score='mean'"):
        AnomalyStats.fit(clean, min_images=50, image_score="mean")


def test_raw_scores_use_one_global_scale_and_miss_what_only_per_pixel_statistics_see():
    from medtrust.metrics.anomaly import _auroc

    stats = AnomalyStats.fit(_clean(400), min_images=50, top_k_percent=2.0)
    clean, bumped = _clean(60, seed=5), _clean(60, seed=6)
    bumped[:, 5:8, 0:3] += 0.15   # unusual only against the small residuals of these columns
    raw = stats.raw_scores(torch.cat([clean, bumped]))
    assert torch.equal(raw.argsort(), top_k_mean(torch.cat([clean, bumped]), 2.0).argsort())  # = raw top-k ranks
    y = np.r_[np.zeros(60), np.ones(60)]
    assert _auroc(stats.image_scores(torch.cat([clean, bumped])).numpy(), y) > 0.95
    assert _auroc(raw.numpy(), y) < 0.75


def test_thresholds_from_held_out_clean_images_carry_over_where_in_sample_ones_do_not():
    """The in-sample threshold is fitted on the images whose own mean and std make their z small: on new
    clean images it flags more than its nominal 5 %. Held-out clean images give one that carries over."""
    g = torch.Generator().manual_seed(0)
    scale = torch.rand(16, 16, generator=g) * 0.2 + 0.01   # every pixel its own scale

    def clean(n: int, seed: int) -> torch.Tensor:
        return torch.randn(n, 16, 16, generator=torch.Generator().manual_seed(seed)) * scale + 1.0

    fit, held, new = clean(30, 1), clean(200, 2), clean(2000, 3)
    kw = dict(min_images=20, image_score="excess", excess_z=3.0, max_flag_rate=0.05)
    inside = AnomalyStats.fit(fit, **kw)
    outside = AnomalyStats.fit(fit, threshold_residuals=held, **kw)
    assert inside.thresholds_in_sample and not outside.thresholds_in_sample and outside.n_threshold_images == 200
    rate_in = float((inside.image_scores(new) > inside.image_threshold).float().mean())
    rate_out = float((outside.image_scores(new) > outside.image_threshold).float().mean())
    assert rate_in > 0.15 and rate_out < 0.08
    with pytest.raises(TooFewImagesError):
        AnomalyStats.fit(fit, threshold_residuals=held[:5], **kw)


def test_several_scales_are_z_scored_each_against_their_own_statistics_and_fused_by_the_maximum(tmp_path):
    """Two noise levels: an artifact that only the second scale's residual shows (a large blob the
    small t0 reconstructs) is found by the fused map, and the fused map is the per-pixel maximum."""
    small, large = _clean(300, seed=1), _clean(300, seed=2) * 3   # the large t0 leaves larger residuals
    fit = torch.stack([small, large], dim=1)                       # N×S×H×W
    stats = AnomalyStats.fit(fit, min_images=50, image_score="excess", excess_z=3.0)
    assert stats.n_scales == 2 and tuple(stats.mean.shape) == (2, 16, 16) and len(stats.global_mean) == 2
    new = torch.stack([_clean(40, seed=3), _clean(40, seed=4) * 3], dim=1)
    blob = new.clone()
    blob[:20, 1, 4:12, 4:12] += 1.0                                # seen at the large scale only
    z = stats.zscore(blob)
    single = [AnomalyStats.fit(fit[:, s], min_images=50) for s in range(2)]
    assert z.shape == (40, 16, 16)
    assert torch.allclose(z, torch.maximum(single[0].zscore(blob[:, 0]), single[1].zscore(blob[:, 1])), atol=1e-5)
    s = stats.image_scores(blob)
    assert float(s[:20].min()) > float(s[20:].max())               # the blob images, every one above the clean
    assert stats.raw_scores(blob).shape == (40,)
    back = AnomalyStats.load(stats.save(tmp_path / "multi.pt"))
    assert torch.equal(back.image_scores(blob), s) and back.global_mean == stats.global_mean
    with pytest.raises(ValueError, match="2 scale"):
        stats.zscore(blob[:, :1])                                   # one scale where two were fitted
    with pytest.raises(ValueError, match="N×S×H×W"):
        AnomalyStats.fit(torch.zeros(60, 1, 2, 16, 16), min_images=50)
