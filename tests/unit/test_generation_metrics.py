"""Generation metrics: FID / KID / IS against hand-written references, MS-SSIM at 64 px, planted
near copies, a trained alignment model, accuracy CIs, and None (not 0) wherever a figure is undefined."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import linalg

from medtrust.metrics import generation as gm


def _net(d: int = 8, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, d, 5, stride=4), nn.Tanh())  # pooled by the wrapper -> N×d


def _textures(n: int, seed: int, shift: float = 0.0, size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=size, mode="bilinear", align_corners=False)
    return (x + shift).clamp(0, 1)


def _frechet(f1: np.ndarray, f2: np.ndarray) -> float:
    m1, m2 = f1.mean(0), f2.mean(0)
    c1, c2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    return float(((m1 - m2) ** 2).sum() + np.trace(c1 + c2 - 2 * linalg.sqrtm(c1 @ c2).real))


# -- feature networks and FID / KID / IS -------------------------------------------------------------
def test_feature_extractor_follows_the_torchmetrics_contract():
    from torchmetrics.image.fid import FrechetInceptionDistance

    fe = gm.feature_extractor(_net(), 8)
    u8 = torch.randint(0, 256, (6, 3, 64, 64), dtype=torch.uint8)
    assert torch.equal(fe(u8), fe(u8.float() / 255))  # uint8 (normalize=False) and [0, 1] floats agree
    assert fe(u8).shape == (6, 8)
    # handed to torchmetrics directly (it calls fe on the uint8 images) = fid_kid's features-once path
    real, fake = _textures(20, 1), _textures(20, 2, 0.1)
    direct = FrechetInceptionDistance(feature=fe)
    direct.update((real * 255).round().byte(), real=True)
    direct.update((fake * 255).round().byte(), real=False)
    ours = gm.fid_kid((real * 255).round() / 255, (fake * 255).round() / 255, fe, 10)
    assert ours["fid"] == pytest.approx(float(direct.compute()), rel=1e-6)
    assert ours["comparable_to_published"] is False and "not Inception" in ours["feature_network"]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fe(torch.full((1, 3, 8, 8), 2.0))
    with pytest.raises(ValueError, match="num_features"):
        gm.feature_extractor(_net(), 7)(real[:2])
    heads = nn.Module()
    heads.forward = lambda x: {"a": x.mean((2, 3))}
    assert gm.feature_extractor(heads, 3, output="a")(real[:2]).shape == (2, 3)
    with pytest.raises(ValueError, match="output="):
        gm.feature_extractor(heads, 3)(real[:2])


def test_fid_is_zero_for_a_set_with_itself_larger_when_shifted_and_matches_the_formula():
    fe = gm.feature_extractor(_net(), 8)
    x = _textures(40, 0)
    same = gm.fid_kid(x, x, fe, 20)
    assert same["fid"] == pytest.approx(0.0, abs=1e-6)
    small, big = gm.fid_kid(x, _textures(40, 5), fe, 20), gm.fid_kid(x, _textures(40, 5, 0.3), fe, 20)
    assert big["fid"] > 5 * small["fid"] > 0
    f_real, f_fake = gm.extract_features(x, fe).numpy(), gm.extract_features(_textures(40, 5, 0.3), fe).numpy()
    assert big["fid"] == pytest.approx(_frechet(f_real, f_fake), rel=1e-5)
    assert big["n_real"] == big["n_fake"] == 40 and big["notes"] == []


def test_kid_equals_the_unbiased_mmd_and_orders_like_fid():
    fe = gm.feature_extractor(_net(), 8)
    x, y = _textures(30, 0), _textures(30, 7, 0.3)
    r = gm.fid_kid(x, y, fe, kid_subset_size=500)  # capped at 30: every subset is the whole set
    assert r["kid_subset_size"] == 30 and r["kid_std"] == pytest.approx(0.0, abs=1e-12)
    fx, fy = gm.extract_features(x, fe), gm.extract_features(y, fe)
    k = lambda a, b: (a @ b.T / a.shape[1] + 1) ** 3  # noqa: E731  (poly kernel, degree 3, gamma 1/D, coef 1)
    m = len(fx)
    ref = ((k(fx, fx).sum() - k(fx, fx).diag().sum() + k(fy, fy).sum() - k(fy, fy).diag().sum()) / (m * (m - 1))
           - 2 * k(fx, fy).mean())
    assert r["kid_mean"] == pytest.approx(float(ref), rel=1e-9)
    same_dist = gm.fid_kid(x, _textures(30, 3), fe, 10)
    assert abs(same_dist["kid_mean"]) < r["kid_mean"] / 5
    assert gm.fid_kid(x, y, fe, 10, seed=4)["kid_mean"] == gm.fid_kid(x, y, fe, 10, seed=4)["kid_mean"]  # seeded


@pytest.mark.parametrize("n_real,n_fake", [(5, 1), (1, 5), (5, 0)])
def test_too_few_images_give_none_with_a_reason(n_real, n_fake):
    fe = gm.feature_extractor(_net(), 8)
    r = gm.fid_kid(_textures(n_real, 0), _textures(n_fake, 1), fe, 50)
    assert r["fid"] is None and r["kid_mean"] is None and r["kid_std"] is None
    assert ">= 2" in r["reason"] and (r["n_real"], r["n_fake"]) == (n_real, n_fake)
    s = gm.inception_score(_textures(1, 0), fe)
    assert s["is_mean"] is None and "needs >= 2" in s["reason"]


def test_rank_deficient_fid_is_flagged_not_hidden():
    r = gm.fid_kid(_textures(5, 0), _textures(5, 1), gm.feature_extractor(_net(), 8), 50)
    assert r["fid"] is not None and r["kid_subset_size"] == 5 and "rank-deficient" in r["notes"][0]


class _Logits(nn.Module):
    """Confident logits of class (first pixel value * k) -> IS has a closed form."""

    def __init__(self, k: int, scale: float) -> None:
        super().__init__()
        self.k, self.scale, self.num_features, self.name = k, scale, k, "toy logits"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.uint8  # InceptionScore(normalize=True) always passes uint8
        cls = (x[:, 0, 0, 0].long() * self.k // 256).clamp(max=self.k - 1)
        return F.one_hot(cls, self.k).double() * self.scale


def test_inception_score_is_the_class_count_for_confident_balanced_logits_and_one_for_uniform():
    k = 4
    imgs = torch.zeros(40, 3, 8, 8)
    imgs[:, 0, 0, 0] = (torch.arange(40) % k).float() / k + 0.5 / k
    assert gm.inception_score(imgs, _Logits(k, 60.0), splits=1)["is_mean"] == pytest.approx(k, rel=1e-6)
    flat = gm.inception_score(imgs, _Logits(k, 0.0), splits=4)
    assert flat["is_mean"] == pytest.approx(1.0, abs=1e-9) and flat["splits"] == 4 and flat["feature_network"] == "toy logits"


def test_inception_from_file_names_the_missing_path_and_wires_a_local_file(tmp_path, monkeypatch):
    missing = tmp_path / "no-such-inception.pth"
    with pytest.raises(FileNotFoundError, match="no-such-inception.pth.*no weights can be downloaded"):
        gm.inception_from_file(missing)
    with pytest.raises(ValueError, match="layer"):
        gm.inception_from_file(missing, layer=999)
    import torchmetrics.image.fid as tm_fid

    seen = {}

    class Stub(nn.Module):  # stands in for torch-fidelity's network (not installed here)
        def __init__(self, name, features_list, feature_extractor_weights_path=None):
            super().__init__()
            seen.update(path=feature_extractor_weights_path, layer=features_list)

        def forward(self, x):
            seen["dtype"] = x.dtype
            return torch.zeros(len(x), 2048)

    weights = tmp_path / "weights-inception.pth"
    weights.write_bytes(b"0")
    monkeypatch.setattr(tm_fid, "NoTrainInceptionV3", Stub)
    fe = gm.inception_from_file(weights)
    assert fe(torch.rand(2, 3, 16, 16)).shape == (2, 2048) and seen == {"path": str(weights), "layer": ["2048"],
                                                                       "dtype": torch.uint8}
    assert fe.comparable_to_published is True and "Inception" in fe.name


# -- MS-SSIM diversity --------------------------------------------------------------------------------
@pytest.mark.parametrize("size,method,scales", [(256, "ms_ssim", 5), (176, "ms_ssim", 5), (160, "ms_ssim", 4),
                                                (64, "ms_ssim", 3), (32, "ms_ssim", 2), (16, "ssim", 1), (8, "ssim", 1)])
def test_ms_ssim_settings_fit_the_image(size, method, scales):
    st = gm.ms_ssim_settings(size, size)
    assert (st["method"], st["scales"]) == (method, scales)
    assert st["kernel_size"] <= size and gm._window(st["sigma"]) == st["kernel_size"]
    if method == "ms_ssim":
        assert sum(st["betas"]) == pytest.approx(1.0) and size / 2 ** (scales - 1) >= 11


def test_ms_ssim_settings_reject_a_two_pixel_image():
    with pytest.raises(ValueError, match="too small"):
        gm.ms_ssim_settings(2, 2)


def test_ms_ssim_is_one_for_identical_samples_lower_for_noise_and_is_torchmetrics_value():
    from torchmetrics.image import MultiScaleStructuralSimilarityIndexMeasure

    base = _textures(3, 0)
    identical = [b[None].repeat(3, 1, 1, 1) for b in base]
    r = gm.ms_ssim_diversity(identical, n_boot=200)
    assert r["ms_ssim"] == pytest.approx(1.0, abs=1e-5) and r["method"] == "ms_ssim" and r["scales"] == 3
    assert r["fallback_ssim"] is False and r["n_pairs"] == 9 and r["n_prompts"] == 3
    g = torch.Generator().manual_seed(1)
    noise = [torch.rand(3, 3, 64, 64, generator=g) for _ in range(3)]
    rn = gm.ms_ssim_diversity(noise, n_boot=200)
    assert rn["ms_ssim"] < 0.2 and rn["ci95"][0] <= rn["ms_ssim"] <= rn["ci95"][1]
    pair = _textures(2, 4)
    ref = MultiScaleStructuralSimilarityIndexMeasure(betas=tuple(r["betas"]), data_range=1.0)(pair[:1], pair[1:])
    assert gm.ms_ssim_diversity([pair])["ms_ssim"] == pytest.approx(float(ref), abs=1e-6)
    mixed = gm.ms_ssim_diversity(identical[:1] + noise[:1], n_boot=200)
    assert mixed["ms_ssim"] == pytest.approx(np.mean(mixed["per_prompt"])) and mixed["per_prompt"][0] > mixed["per_prompt"][1]


def test_ms_ssim_falls_back_to_ssim_on_tiny_images_and_is_none_without_pairs():
    r = gm.ms_ssim_diversity([_textures(2, 0, size=16)])
    assert r["fallback_ssim"] is True and r["method"] == "ssim" and 0 < r["ms_ssim"] <= 1 and r["ci95"] is None
    none = gm.ms_ssim_diversity([_textures(1, 0), _textures(1, 1)])
    assert none["ms_ssim"] is None and "2 samples" in none["reason"]


# -- memorisation -------------------------------------------------------------------------------------
def test_chunked_cosine_equals_the_unchunked_product():
    g = torch.Generator().manual_seed(0)
    q, r = torch.randn(37, 12, generator=g), torch.randn(53, 12, generator=g)
    v, i = gm.nearest_cosine(q, r, k=4, chunk_size=5)
    ref_v, ref_i = (F.normalize(q.double(), dim=1) @ F.normalize(r.double(), dim=1).T).topk(4, dim=1)
    assert torch.allclose(v, ref_v, atol=1e-12) and torch.equal(i, ref_i)
    assert gm.nearest_cosine(q, r[:2], k=5)[1].shape == (37, 2)  # k capped by the reference count


def test_planted_copies_are_found_exactly():
    g = torch.Generator().manual_seed(0)
    train = torch.rand(30, 3, 32, 32, generator=g)
    fake = torch.rand(20, 3, 32, 32, generator=g)
    planted = {2: 7, 5: 0, 11: 29, 17: 13}  # fake index -> copied train index
    for f, t in planted.items():
        fake[f] = train[t]
    feats = lambda x: (x - 0.5).flatten(1)  # noqa: E731  (centred pixels: noise images are ~orthogonal)
    r = gm.nearest_training(feats(fake), feats(train), fake, train, cos_threshold=0.95, ssim_threshold=0.9,
                            topk_ssim=3, chunk_size=6, n_boot=200)
    assert r["memorised_share"] == 4 / 20
    flagged = {row["fake"]: row["nearest"] for row in r["rows"] if row["near_copy"]}
    assert flagged == planted and len(r["rows"]) == 20
    assert all(r["rows"][f]["cosine"] == pytest.approx(1.0) and r["rows"][f]["ssim"] == pytest.approx(1.0) for f in planted)
    lo, hi = r["memorised_share_ci"]
    assert lo < 0.2 < hi
    # the SSIM criterion alone (cosine threshold unreachable) finds the same copies among the top-k
    by_ssim = gm.nearest_training(feats(fake), feats(train), fake, train, cos_threshold=1.5, ssim_threshold=0.99,
                                  topk_ssim=3)
    assert {row["fake"]: row["ssim_nearest"] for row in by_ssim["rows"] if row["near_copy"]} == planted
    none = gm.nearest_training(feats(fake[:0]), feats(train), fake[:0], train)
    assert none["memorised_share"] is None and none["reason"]
    with pytest.raises(ValueError, match="differ in length"):
        gm.nearest_training(feats(fake), feats(train), fake[:3], train)


def test_copy_thresholds_calibrated_on_held_out_images_keep_fresh_samples_and_flag_copies():
    """Data as repetitive as a phantom: every fresh sample is very close to some training image, so a
    fixed cosine threshold of 0.95 calls fresh samples copies; thresholds fitted on held-out real
    images flag about 2 (1 - q) of fresh samples and every planted copy."""
    g = torch.Generator().manual_seed(1)
    base = torch.rand(1, 3, 32, 32, generator=g)

    def draw(n: int) -> torch.Tensor:  # one template with small smooth variations
        return (base + 0.08 * F.interpolate(torch.rand(n, 3, 4, 4, generator=g) - 0.5, size=32, mode="bilinear")
                + 0.02 * torch.rand(n, 3, 32, 32, generator=g)).clamp(0, 1)

    train, val, fresh = draw(120), draw(200), draw(200)
    copies = (train[:40] + 0.003 * torch.rand(40, 3, 32, 32, generator=g)).clamp(0, 1)
    feats = lambda x: x.flatten(1)  # noqa: E731
    fixed = gm.nearest_training(feats(fresh), feats(train), fresh, train, cos_threshold=0.95, ssim_threshold=0.9)
    assert fixed["memorised_share"] > 0.9  # the defect calibration fixes
    real = gm.nearest_training(feats(val), feats(train), val, train, cos_threshold=float("inf"),
                               ssim_threshold=float("inf"))
    assert real["memorised_share"] == 0
    rows = real["rows"]
    groups = ["a"] * 150 + ["b"] * 50
    cal = gm.calibrate_copy_thresholds([r["cosine"] for r in rows], [r["ssim"] for r in rows], groups, quantile=0.99,
                                       min_images=60)
    assert cal["groups"]["a"]["n"] == 150 and not cal["groups"]["a"]["pooled"]
    assert cal["groups"]["b"]["pooled"] and cal["groups"]["b"]["cosine"] == cal["pooled"]["cosine"]
    assert cal["groups"]["a"]["cosine"] == pytest.approx(np.quantile([r["cosine"] for r in rows[:150]], 0.99))
    thr = cal["pooled"]
    ok = gm.nearest_training(feats(fresh), feats(train), fresh, train, cos_threshold=thr["cosine"],
                             ssim_threshold=thr["ssim"])
    assert ok["memorised_share"] <= 0.06
    bad = gm.nearest_training(feats(copies), feats(train), copies, train, cos_threshold=thr["cosine"],
                              ssim_threshold=thr["ssim"])
    assert bad["memorised_share"] == 1.0
    # per-image thresholds (one per generated image, e.g. by modality) broadcast row by row
    per = gm.nearest_training(feats(copies[:2]), feats(train), copies[:2], train,
                              cos_threshold=torch.tensor([2.0, 0.0], dtype=torch.float64),
                              ssim_threshold=torch.tensor([2.0, 2.0], dtype=torch.float64))
    assert [r["near_copy"] for r in per["rows"]] == [False, True]
    with pytest.raises(ValueError, match="quantile"):
        gm.calibrate_copy_thresholds([0.5], [0.5], ["a"], quantile=1.0)
    with pytest.raises(ValueError, match="held-out"):
        gm.calibrate_copy_thresholds([], [], [])


def test_evaluator_heads_tell_the_side_of_a_finding_on_a_symmetric_image():
    """Left/right is the only signal (a blob on one side of a mirror-symmetric background): the grid
    heads learn it; the globally pooled FID features stay the same shape."""
    from medtrust.generation.evaluator import EvaluatorNet, predict, train_evaluator

    def make(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        side = torch.randint(0, 2, (n,), generator=g)
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
        bg = 0.3 + 0.2 * torch.exp(-(xx ** 2 + yy ** 2) / 0.3)
        imgs = bg.expand(n, 3, 32, 32).clone() + 0.03 * torch.randn(n, 3, 32, 32, generator=g)
        for i, s in enumerate(side.tolist()):
            cy = float(torch.empty(1).uniform_(-0.5, 0.5, generator=g))
            cx = (0.5 if s else -0.5) + float(torch.empty(1).uniform_(-0.1, 0.1, generator=g))
            imgs[i] += 0.35 * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.02)
        return imgs.clamp(0, 1), side

    x, y = make(256, 0)
    xt, yt = make(128, 1)
    net = train_evaluator(x, {"side": y}, epochs=8, batch_size=32, width=8, seed=0, head_grid=2)
    p = predict(net, xt)
    assert float((p["side"] == yt).float().mean()) >= 0.95
    assert p["features"].shape == (128, net.feature_dim) and net.heads["side"].in_features == 4 * net.feature_dim
    with pytest.raises(ValueError, match="head_grid"):
        EvaluatorNet({"side": 2}, head_grid=0)


def test_evaluator_is_trained_again_while_a_head_has_not_fitted_a_group_of_its_training_images(monkeypatch):
    """The restart reads the training images' accuracy per group (never val): a first seed whose
    finding head is at chance on group 1 is replaced by the next seed; when every seed fails, the
    best worst group is kept and every attempt is recorded."""
    import medtrust.generation.evaluator as ev

    script = {0: 0.55, 1: 0.97, 2: 0.99, 10: 0.4, 11: 0.6, 12: 0.5}
    seen: list[tuple[int, int]] = []

    def fake_train(images, targets, seed=0, **kw):
        net = torch.nn.Linear(1, 1)
        net.seed = seed
        return net

    def fake_acc(net, images, targets, groups):
        seen.append((net.seed, len(images)))
        return {0: {"modality": 1.0, "finding": 1.0}, 1: {"modality": 1.0, "finding": script[net.seed]}}

    monkeypatch.setattr(ev, "train_evaluator", fake_train)
    monkeypatch.setattr(ev, "train_accuracy_by_group", fake_acc)
    x, t, g = torch.zeros(6, 3, 8, 8), {"finding": torch.zeros(6, dtype=torch.long)}, torch.tensor([0, 0, 0, 1, 1, 1])
    net, tries = ev.train_evaluator_checked(x, t, g, min_train_accuracy=0.9, attempts=3, seed=0)
    assert net.seed == 1 and [a["seed"] for a in tries] == [0, 1] and [a["kept"] for a in tries] == [False, True]
    assert tries[0]["group"] == 1 and tries[0]["head"] == "finding" and tries[0]["worst_train_accuracy"] == 0.55
    assert all(n == 6 for _, n in seen)  # judged on the training images it was given
    net, tries = ev.train_evaluator_checked(x, t, g, min_train_accuracy=0.9, attempts=3, seed=10)
    assert net.seed == 11 and len(tries) == 3 and [a["kept"] for a in tries] == [False, True, False]


def test_real_per_group_training_accuracy_catches_an_unfitted_head():
    """train_accuracy_by_group on a real (untrained) judge: a head is judged per group on the images."""
    from medtrust.generation.evaluator import EvaluatorNet, train_accuracy_by_group

    torch.manual_seed(0)
    net = EvaluatorNet({"finding": 3}, 3, 8, 2).eval()
    x = torch.rand(12, 3, 16, 16)
    groups = torch.tensor([0] * 6 + [1] * 6)
    pred = net(x)["finding"].argmax(1)
    target = pred.clone()
    target[6:] = (pred[6:] + 1) % 3  # group 1 always wrong
    acc = train_accuracy_by_group(net, x, {"finding": target}, groups)
    assert acc[0]["finding"] == 1.0 and acc[1]["finding"] == 0.0


# -- alignment -----------------------------------------------------------------------------------------
def _shapes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n 32-px images of a coloured square or disk on noise; class = colour (3) × shape (2)."""
    g = torch.Generator().manual_seed(seed)
    cls = torch.randint(0, 6, (n,), generator=g)
    imgs = 0.5 + 0.05 * torch.randn(n, 3, 32, 32, generator=g)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    for i, c in enumerate(cls.tolist()):
        cy, cx = torch.randint(10, 22, (2,), generator=g).tolist()
        mask = ((yy - cy).abs() <= 6) & ((xx - cx).abs() <= 6) if c % 2 else (yy - cy) ** 2 + (xx - cx) ** 2 <= 36
        imgs[i, :, mask] = 0.1
        imgs[i, c // 2, mask] = 0.95
    return imgs.clamp(0, 1), cls


def test_alignment_model_scores_matching_prompts_above_shuffled_ones():
    text_of_class = torch.randn(6, 16, generator=torch.Generator().manual_seed(9))  # a frozen "text encoder"
    x, c = _shapes(120, 0)
    model = gm.train_alignment_model(x, text_of_class[c], epochs=12, batch_size=32, lr=3e-3, seed=0, width=8)
    xt, ct = _shapes(60, 1)
    match = gm.alignment_scores(model, xt, text_of_class[ct])
    shuffled = gm.alignment_scores(model, xt, text_of_class[ct][torch.roll(torch.arange(60), 1)])
    assert match.shape == (60,) and match.min() >= 0 and match.max() <= 100
    assert shuffled.min() == 0.0 and (shuffled == 0).sum() > 10  # negative cosines are clipped to 0 (CLIPScore)
    contrast = gm.alignment_contrast(match, shuffled, n_boot=500)
    assert contrast["diff"] == pytest.approx(match.mean() - shuffled.mean()) and contrast["ci95"][0] > 0
    again = gm.train_alignment_model(x, text_of_class[c], epochs=12, batch_size=32, lr=3e-3, seed=0, width=8)
    assert np.array_equal(gm.alignment_scores(again, xt, text_of_class[ct]), match)  # deterministic for a seed
    rebuilt = gm.AlignmentModel(**model.config())
    rebuilt.load_state_dict(model.state_dict())
    assert np.allclose(gm.alignment_scores(rebuilt, xt, text_of_class[ct]), match)


def test_info_nce_treats_identical_prompts_as_positives_of_each_other():
    txt = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=1)  # rows 0 and 1: the same prompt
    img = F.normalize(torch.tensor([[1.0, 0.2], [0.9, -0.1], [0.1, 1.0]]), dim=1)
    scale = torch.tensor(math.log(10.0))
    logits = 10.0 * img @ txt.T
    target = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    by_hand = 0.5 * (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.T.log_softmax(1)).sum(1).mean())
    assert float(gm.info_nce(img, txt, scale)) == pytest.approx(float(by_hand), rel=1e-6)


def test_alignment_contrast_is_paired_and_refuses_unpaired_scores():
    a = np.array([3.0, 5.0, 4.0, 6.0])
    r = gm.alignment_contrast(a, a - 1, n_boot=200)
    assert r["diff"] == pytest.approx(1.0) and r["ci95"] == pytest.approx([1.0, 1.0]) and r["n"] == 4
    assert gm.alignment_contrast([], [])["diff"] is None
    with pytest.raises(ValueError, match="differ in length"):
        gm.alignment_contrast(a, a[:3])


# -- attribute accuracy, grouping, assembly ----------------------------------------------------------------
def test_attribute_accuracy_wilson_interval_by_hand():
    pred, target = ["ct"] * 8 + ["mri"] * 2, ["ct"] * 10
    r = gm.attribute_accuracy(pred, target)
    z, n, p = 1.959963984540054, 10, 0.8
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert r["accuracy"] == 0.8 and r["n_correct"] == 8 and r["ci95"] == pytest.approx([centre - half, centre + half])
    assert gm.attribute_accuracy(torch.ones(5), torch.ones(5))["ci95"][1] == pytest.approx(1.0)
    assert gm.attribute_accuracy(torch.ones(5), torch.ones(5))["ci95"][0] < 1  # Wilson does not collapse at 100 %
    boot = gm.attribute_accuracy(np.r_[np.ones(15), np.zeros(5)], np.ones(20), method="bca", n_boot=300)
    assert boot["ci95"][0] < 0.75 < boot["ci95"][1]
    assert gm.attribute_accuracy([], [])["accuracy"] is None
    with pytest.raises(ValueError, match="method"):
        gm.attribute_accuracy([1], [1], method="exact")


def test_per_group_runs_fn_on_all_rows_and_each_group():
    rows = [{"modality": m} for m in ("ct", "mri", "ct", "xray", "ct")]
    r = gm.per_group(rows, "modality", lambda idx: idx.tolist(), order=["xray", "ct", "mri", "pet"])
    assert r == {"overall": [0, 1, 2, 3, 4], "groups": {"xray": [3], "ct": [0, 2, 4], "mri": [1]}}


def test_generation_metrics_json_per_modality_with_none_and_notes():
    fe = gm.feature_extractor(_net(), 8)
    fake = torch.cat([_textures(6, 0), _textures(1, 1, 0.2)])
    mods = ["ct"] * 6 + ["mri"]
    out = gm.generation_metrics_json(
        mods, fake=fake, real=torch.cat([_textures(10, 2), _textures(4, 3, 0.2)]), real_modality=["ct"] * 10 + ["mri"] * 4,
        feature=fe, prompt_id=[0, 0, 1, 1, 2, 2, 3], modality_pred=["ct"] * 5 + ["mri", "mri"],
        near_copy=[0, 0, 1, 0, 0, 0, 0], n_boot=200)
    keys = {"fid", "kid", "ms_ssim", "alignment", "modality_accuracy", "finding_accuracy", "memorised_share"}
    for block in (out["overall"], *out["modalities"].values()):
        assert keys <= set(block) and {f"{k}_ci" for k in ("ms_ssim", "alignment", "modality_accuracy")} <= set(block)
    ov, ct, mri = out["overall"], out["modalities"]["ct"], out["modalities"]["mri"]
    assert list(out["modalities"]) == ["ct", "mri"] and out["comparable_to_published"] is False
    assert (ov["n_images"], ov["n_real"], ct["n_real"], mri["n_real"]) == (7, 14, 10, 4)
    assert ct["modality_accuracy"] == 5 / 6 and mri["modality_accuracy"] == 1.0 and ov["memorised_share"] == 1 / 7
    assert ct["fid"] > 0 and 0 < ct["ms_ssim"] <= 1 and ct["ms_ssim_ci"][0] <= ct["ms_ssim"] <= ct["ms_ssim_ci"][1]
    assert mri["fid"] is None and mri["kid"] is None and mri["ms_ssim"] is None  # one image: undefined, not 0
    assert any(">= 2" in n for n in mri["notes"]) and any("2 samples" in n for n in mri["notes"])
    assert ov["alignment"] is None and ov["finding_accuracy"] is None and "alignment not measured" in ov["notes"]
    with pytest.raises(ValueError, match="entries"):
        gm.generation_metrics_json(mods, alignment=[1.0])
