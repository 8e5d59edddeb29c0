"""Model-parameter randomisation sanity check (Adebayo et al. 2018) on a tiny conv net."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from medtrust.xai.sanity import map_similarity, randomisation_check, randomised_copy

X = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def tiny_net() -> nn.Module:
    """Conv-BN-ReLU-Linear; "trained" weights read only the top-left 3×3 pixels (set by hand, so
    the saliency is concentrated there), BN running statistics away from their defaults."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 8 * 8, 1))
    with torch.no_grad():
        w = torch.zeros(4, 8, 8)
        w[:, :3, :3] = 1.0
        net[4].weight.copy_(w.reshape(1, -1))
        net[1].weight.fill_(2.0)
        net[1].running_mean.fill_(0.2)
        net[1].running_var.fill_(0.5)
    return net.eval()


def gradient_saliency(model: nn.Module) -> np.ndarray:
    x = X.clone().requires_grad_(True)
    model(x).sum().backward()
    return x.grad.abs().amax(1).numpy()


def edge_map(model: nn.Module) -> np.ndarray:
    """An "explanation" that ignores the model: Sobel gradient magnitude of the input."""
    img = X[:, 0].numpy()
    return np.stack([np.hypot(ndimage.sobel(i, 0), ndimage.sobel(i, 1)) for i in img])


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_randomised_copy_leaves_original_untouched_and_keeps_buffers():
    net = tiny_net()
    before = state(net)
    rand = randomised_copy(net, seed=3)
    after = state(net)
    assert all(torch.equal(before[k], after[k]) for k in before)
    r = rand.state_dict()
    assert not torch.equal(r["0.weight"], before["0.weight"])
    assert not torch.equal(r["4.weight"], before["4.weight"])
    assert not torch.equal(r["0.bias"], before["0.bias"])
    assert torch.equal(r["1.weight"], torch.ones(4))  # BN affine reset to its default
    assert torch.equal(r["1.running_mean"], before["1.running_mean"])  # buffers kept
    assert torch.equal(r["1.running_var"], before["1.running_var"])
    assert not rand.training and rand is not net


def test_randomised_copy_is_seeded_and_does_not_touch_global_rng():
    net = tiny_net()
    a, b, c = (state(randomised_copy(net, seed=s)) for s in (5, 5, 6))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["0.weight"], c["0.weight"])
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    randomised_copy(net, seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_randomised_copy_warns_about_parameters_it_cannot_reset():
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.full((1,), 3.0))
            self.lin = nn.Linear(2, 2)

    with pytest.warns(UserWarning, match=r"\['gain'\]"):
        rand = randomised_copy(Scale())
    assert rand.gain.item() == 3.0


A = np.random.default_rng(0).random((8, 8)) + 0.1


@pytest.mark.parametrize(("b", "spearman", "ssim"), [
    (A, (1.0, 1.0), (1.0, 1.0)),
    (3 * A + 1, (1.0, 1.0), (1.0, 1.0)),   # ranks and min-max normalisation ignore affine rescaling
    (-A, (1.0, 1.0), (-1.0, 0.0)),         # |a| identical (abs), but the map itself is inverted
    (A.T, (-0.5, 0.5), (-0.5, 0.5)),       # unrelated layout
])
def test_map_similarity(b, spearman, ssim):
    out = map_similarity(A, b)
    assert spearman[0] - 1e-9 <= out["spearman_abs"] <= spearman[1] + 1e-9
    assert ssim[0] - 1e-9 <= out["ssim"] <= ssim[1] + 1e-9
    if spearman[0] == spearman[1]:
        assert out["spearman_abs"] == pytest.approx(spearman[0])
    if ssim[0] == ssim[1]:
        assert out["ssim"] == pytest.approx(ssim[0])


def test_map_similarity_undefined_and_bad_shapes():
    a = np.random.default_rng(0).random((8, 8))
    out = map_similarity(a, np.full((8, 8), 2.0))
    assert np.isnan(out["spearman_abs"]) and np.isnan(out["ssim"])
    nan_map = a.copy()
    nan_map[0, 0] = np.nan
    assert all(np.isnan(v) for v in map_similarity(a, nan_map).values())
    small = map_similarity(a[:2, :2], a[:2, :2])  # too small for an SSIM window
    assert small["spearman_abs"] == pytest.approx(1.0) and np.isnan(small["ssim"])
    assert map_similarity(a[:4, :5], a[:4, :5])["ssim"] == pytest.approx(1.0)  # window 3
    with pytest.raises(ValueError, match="H×W maps of one shape"):
        map_similarity(a, a[:4])
    with pytest.raises(ValueError, match="H×W maps of one shape"):
        map_similarity(a[None], a[None])


def test_gradient_saliency_passes():
    net = tiny_net()
    before = state(net)
    out = randomisation_check(gradient_saliency, net, seed=0)
    assert out["passes"] is True
    assert out["spearman_abs"] < 0.3 and out["ssim"] < 0.3
    assert out["n_images"] == 4 and out["n_undefined"] == 0 and out["threshold"] == 0.5
    assert len(out["spearman_abs_per_image"]) == len(out["ssim_per_image"]) == 4
    assert out["spearman_abs"] == pytest.approx(np.mean(out["spearman_abs_per_image"]))
    assert all(torch.equal(v, before[k]) for k, v in state(net).items())
    again = randomisation_check(gradient_saliency, net, seed=0)  # deterministic
    assert again["spearman_abs_per_image"] == out["spearman_abs_per_image"]


def test_model_independent_explanation_fails():
    out = randomisation_check(edge_map, tiny_net(), seed=0)
    assert out["passes"] is False
    assert out["spearman_abs"] == pytest.approx(1.0) and out["ssim"] == pytest.approx(1.0)
    # a threshold above 1 would let even the edge map pass: the flag is only as good as the cut-off
    assert randomisation_check(edge_map, tiny_net(), threshold=1.01)["passes"] is True


def test_randomisation_check_accepts_torch_and_rejects_bad_shapes():
    out = randomisation_check(lambda m: torch.from_numpy(edge_map(m)), tiny_net())
    assert out["passes"] is False
    with pytest.raises(ValueError, match="N×H×W"):
        randomisation_check(lambda m: edge_map(m)[0], tiny_net())
    all_nan = randomisation_check(lambda m: np.full((2, 8, 8), np.nan), tiny_net())
    assert np.isnan(all_nan["spearman_abs"]) and all_nan["passes"] is False and all_nan["n_undefined"] == 2
