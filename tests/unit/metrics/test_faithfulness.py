"""Deletion / insertion (RISE) with hand-made forwards whose curves are known exactly."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medtrust.metrics.faithfulness import deletion_insertion

IMG = torch.tensor([[4.0, 3.0], [2.0, 1.0]])[None, None]  # 1×1×2×2, total 10


def total(x: torch.Tensor) -> torch.Tensor:
    """Linear score: the sum of all pixel values (each pixel's contribution = its value)."""
    return x.sum((1, 2, 3))


@pytest.mark.parametrize(("heat", "n_steps", "normalise", "deletion", "insertion", "d_auc", "i_auc"), [
    # correct ranking: delete 4, 3, 2, 1
    (IMG[:, 0], 4, True, [1, .6, .3, .1, 0], [0, .4, .7, .9, 1], .375, .625),
    # reversed ranking: delete 1, 2, 3, 4
    (-IMG[:, 0], 4, True, [1, .9, .7, .4, 0], [0, .1, .3, .6, 1], .625, .375),
    (IMG[:, 0], 4, False, [10, 6, 3, 1, 0], [0, 4, 7, 9, 10], 3.75, 6.25),
    # f = 0, 1/3, 2/3, 1 -> 0, 1, 3, 4 pixels (k*HW rounded half up)
    (IMG[:, 0], 3, False, [10, 6, 1, 0], [0, 4, 9, 10], (5 + 6 + 1 + 0) / 3, (0 + 4 + 9 + 5) / 3),
])
def test_linear_forward_hand_computed(heat, n_steps, normalise, deletion, insertion, d_auc, i_auc):
    out = deletion_insertion(total, IMG, heat, n_steps=n_steps, normalise=normalise)
    assert out["deletion_curve"][0].tolist() == pytest.approx(deletion)
    assert out["insertion_curve"][0].tolist() == pytest.approx(insertion)
    assert out["fractions"].tolist() == pytest.approx(np.linspace(0, 1, n_steps + 1).tolist())
    assert out["deletion_auc"][0] == pytest.approx(d_auc)
    assert out["insertion_auc"][0] == pytest.approx(i_auc)
    assert out["score"][0] == pytest.approx(10.0)


def test_baseline_replaces_pixels():
    base = torch.ones_like(IMG)
    out = deletion_insertion(total, IMG, IMG[:, 0].numpy(), baseline=base, n_steps=4, normalise=False)
    assert out["deletion_curve"][0].tolist() == pytest.approx([10, 7, 5, 4, 4])
    assert out["insertion_curve"][0].tolist() == pytest.approx([4, 7, 9, 10, 10])


def test_all_channels_of_a_pixel_are_removed_together():
    img = torch.cat([IMG, 2 * IMG], 1)  # 1×2×2×2, total 30
    out = deletion_insertion(total, img, IMG[:, 0], n_steps=4)
    assert out["deletion_curve"][0].tolist() == pytest.approx([1, .6, .3, .1, 0])
    assert out["score"][0] == pytest.approx(30.0)


def test_region_target_with_tied_heatmap():
    """Score = sum over the top-left 4×4 region of an all-ones 8×8 image; heatmap = that region."""
    img = torch.ones(1, 1, 8, 8)
    heat = torch.zeros(1, 8, 8)
    heat[:, :4, :4] = 1.0
    out = deletion_insertion(lambda x: x[:, 0, :4, :4].sum((1, 2)), img, heat, n_steps=4)
    # f = 1/4 -> 16 pixels = exactly the region
    assert out["deletion_curve"][0].tolist() == pytest.approx([1, 0, 0, 0, 0])
    assert out["insertion_curve"][0].tolist() == pytest.approx([0, 1, 1, 1, 1])
    assert out["deletion_auc"][0] == pytest.approx(0.125)
    assert out["insertion_auc"][0] == pytest.approx(0.875)


def test_correct_ranking_beats_random_rankings():
    gen = torch.Generator().manual_seed(0)
    img = torch.rand(1, 1, 12, 12, generator=gen) + 0.1
    good = deletion_insertion(total, img, img[:, 0], n_steps=12)
    rand = torch.rand(20, 12, 12, generator=gen)
    bad = deletion_insertion(total, img.expand(20, -1, -1, -1), rand, n_steps=12)
    assert good["deletion_auc"][0] < bad["deletion_auc"].min()
    assert good["insertion_auc"][0] > bad["insertion_auc"].max()
    assert abs(bad["deletion_auc"].mean() - 0.5) < 0.05  # random ranking ~ the diagonal


def test_batching_is_invisible_and_runs_without_grad():
    gen = torch.Generator().manual_seed(1)
    img = torch.rand(3, 2, 5, 5, generator=gen).requires_grad_(True)
    heat = torch.rand(3, 5, 5, generator=gen)
    w = torch.rand(2, 5, 5, generator=gen)
    calls: list[tuple[int, bool]] = []

    def fwd(x):
        calls.append((len(x), torch.is_grad_enabled()))
        return torch.sigmoid((x * w).sum((1, 2, 3)) - 3)

    ref = deletion_insertion(fwd, img, heat, n_steps=6, batch_size=64)
    assert calls == [(2 * 3 * 7, False)]
    calls.clear()
    out = deletion_insertion(fwd, img, heat, n_steps=6, batch_size=5)
    assert max(n for n, _ in calls) <= 5 and sum(n for n, _ in calls) == 2 * 3 * 7
    assert not any(g for _, g in calls)
    for key in ("deletion_curve", "insertion_curve", "deletion_auc", "insertion_auc"):
        np.testing.assert_allclose(out[key], ref[key], rtol=1e-6)
    # image i of the batch is scored as if it were alone
    one = deletion_insertion(fwd, img[1:2], heat[1:2], n_steps=6)
    np.testing.assert_allclose(one["deletion_curve"][0], ref["deletion_curve"][1], rtol=1e-6)
    np.testing.assert_allclose(one["insertion_curve"][0], ref["insertion_curve"][1], rtol=1e-6)


def test_undefined_images_are_nan_others_unaffected():
    img = torch.cat([IMG, IMG, torch.zeros_like(IMG)])  # third image has score 0
    heat = torch.stack([IMG[0, 0], torch.zeros(2, 2), IMG[0, 0]])  # second heatmap all-zero
    out = deletion_insertion(total, img, heat, n_steps=4)
    assert out["deletion_auc"][0] == pytest.approx(0.375)
    assert np.isnan(out["deletion_auc"][1]) and np.isnan(out["insertion_auc"][1])
    assert np.isnan(out["deletion_auc"][2]) and np.isnan(out["insertion_curve"][2]).all()
    heat_nan = IMG[:, 0].clone()
    heat_nan[0, 0, 0] = float("nan")
    assert np.isnan(deletion_insertion(total, IMG, heat_nan, n_steps=4)["insertion_auc"][0])
    # unnormalised: a zero score is fine
    raw = deletion_insertion(total, img[2:], heat[2:], n_steps=4, normalise=False)
    assert raw["deletion_auc"][0] == 0.0


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"heatmaps": torch.zeros(1, 2, 3)}, "heatmaps must be B×H×W"),
    ({"heatmaps": torch.zeros(2, 2, 2)}, "heatmaps must be B×H×W"),
    ({"baseline": torch.zeros(1, 1, 2, 3)}, "baseline shape"),
    ({"n_steps": 0}, "n_steps"),
    ({"batch_size": 0}, "batch_size"),
    ({"images": IMG[0]}, "images must be B×C×H×W"),
    ({"forward": lambda x: x.sum((2, 3)).repeat(1, 2)}, "one score per image"),
])
def test_bad_inputs(kwargs, match):
    args = {"forward": total, "images": IMG, "heatmaps": IMG[:, 0], **kwargs}
    with pytest.raises(ValueError, match=match):
        deletion_insertion(**args)
