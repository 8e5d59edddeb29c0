"""Split-conformal sets (LAC / APS / RAPS) and conformal risk control of the pixel FNR."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medtrust.metrics import conformal as cp


def sample(rng: np.random.Generator, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated synthetic predictions: labels drawn from the predicted probabilities."""
    logits = rng.normal(size=(n, k)) * 2
    p = np.exp(logits)
    p /= p.sum(1, keepdims=True)
    y = np.array([rng.choice(k, p=q) for q in p])
    return p, y


@pytest.mark.parametrize("k", [2, 3, 5])
def test_lac_sets_equal_mapie(k):
    """Our LAC quantile is MAPIE's (k-th smallest score, k = ceil((n+1)(1-alpha))): the same sets."""
    mapie = pytest.importorskip("mapie.classification")
    from sklearn.base import BaseEstimator, ClassifierMixin

    class Passthrough(ClassifierMixin, BaseEstimator):  # the probabilities are the features
        def __init__(self, n_classes: int = 2) -> None:
            self.n_classes = n_classes

        def fit(self, X, y=None):
            self.classes_, self.n_features_in_ = np.arange(self.n_classes), X.shape[1]
            return self

        def predict_proba(self, X):
            return np.asarray(X, dtype=float)

        def predict(self, X):
            return np.asarray(X).argmax(1)

    rng = np.random.default_rng(k)
    pc, yc = sample(rng, 300, k)
    pt, _ = sample(rng, 2000, k)
    m = mapie.SplitConformalClassifier(Passthrough(k).fit(pc), confidence_level=0.9, conformity_score="lac",
                                       prefit=True).conformalize(pc, yc)
    theirs = m.predict_set(pt)[1][:, :, 0]
    ours = cp.predict_sets(pt, cp.fit_sets(pc, yc, 0.1, "lac"), "lac")
    assert (theirs == ours).all()


@pytest.mark.parametrize("method", cp.METHODS)
@pytest.mark.parametrize("k", [2, 4])
def test_coverage_guarantee_holds_on_average(method, k):
    """Over 150 exchangeable calibration/test draws the mean coverage lies in [1 - alpha, 1 - alpha + 1/(n+1)]
    (up to the Monte-Carlo error), and the sets shrink with a larger alpha."""
    rng = np.random.default_rng(1)
    cov, size10, size30 = [], [], []
    for r in range(150):
        pc, yc = sample(rng, 100, k)
        pt, yt = sample(rng, 400, k)
        sets = cp.predict_sets(pt, cp.fit_sets(pc, yc, 0.1, method, seed=r), method, seed=10_000 + r)
        s = cp.set_summary(sets, yt)
        cov.append(s["coverage"])
        size10.append(s["mean_size"])
        size30.append(cp.predict_sets(pt, cp.fit_sets(pc, yc, 0.3, method, seed=r), method, seed=r).sum(1).mean())
    se = np.std(cov) / np.sqrt(len(cov))
    assert 0.9 - 3 * se <= np.mean(cov) <= 0.9 + 1 / 101 + 3 * se
    assert np.mean(size30) < np.mean(size10)


def test_quantile_is_the_kth_smallest():
    s = np.arange(1, 20, dtype=float)          # n = 19, alpha 0.1 -> k = ceil(20 * 0.9) = 18
    assert cp.conformal_quantile(s, 0.1) == 18.0


def test_aps_and_raps_scores():
    p = np.array([[0.6, 0.3, 0.1]])
    assert np.allclose(cp.class_scores(p, "aps"), [[0.6, 0.9, 1.0]])              # u = 1: cumulative mass
    assert np.allclose(cp.class_scores(p, "aps", u=np.array([0.5])), [[0.3, 0.75, 0.95]])
    assert np.allclose(cp.class_scores(p, "raps", k_reg=1, lam=0.1), [[0.6, 1.0, 1.2]])
    assert np.allclose(cp.class_scores(p, "lac"), [[0.4, 0.7, 0.9]])
    assert cp.set_strings(np.array([[True, False, True], [False, False, False]])) == ["0|2", ""]


@pytest.mark.parametrize("alpha", [0, 1, -0.1, 1.5, "x", None, float("nan")])
def test_bad_alpha_is_refused(alpha):
    with pytest.raises(ValueError, match=r"evaluation.conformal.alpha .*\(0, 1\)"):
        cp.check_alpha(alpha, "evaluation.conformal.alpha")


def test_too_few_calibration_images_are_refused():
    pc, yc = sample(np.random.default_rng(0), 8, 2)
    with pytest.raises(ValueError, match=r"8 calibration image\(s\) are too few for alpha=0.1.*ceil\(1/alpha\) - 1 = 9"):
        cp.fit_sets(pc, yc, 0.1, "lac")
    cp.fit_sets(pc, yc, 0.2, "lac")           # 8 >= ceil(5) - 1 = 4: fine


def _seg(rng: np.random.Generator, n: int, size: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Random discs; the probability map is a noisy, blurred version of the mask."""
    yy, xx = np.mgrid[:size, :size]
    masks, probs = [], []
    for _ in range(n):
        cy, cx, r = rng.uniform(6, size - 6, 2).tolist() + [rng.uniform(3, 6)]
        m = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2).astype(np.float32)
        p = np.clip(0.45 * m + 0.2 + rng.normal(0, 0.2, m.shape), 0, 1).astype(np.float32)
        masks.append(m)
        probs.append(p)
    return torch.from_numpy(np.stack(probs))[:, None], torch.from_numpy(np.stack(masks))[:, None]


def test_crc_controls_the_fnr_on_exchangeable_images():
    """The threshold fitted on 100 images keeps the mean FNR of 20 fresh draws of 100 images near or
    below alpha (the guarantee is in expectation), and a fixed 0.5 threshold does not."""
    rng = np.random.default_rng(0)
    fnrs, fnr_half = [], []
    for _ in range(20):
        pc, mc = _seg(rng, 100)
        fit = cp.crc_fnr_threshold(pc, mc, 0.1)
        pt, mt = _seg(rng, 100)
        fnrs.append(cp.fnr_curve(pt, mt, [fit["threshold"]]).mean())
        fnr_half.append(cp.fnr_curve(pt, mt, [0.5]).mean())
        assert fit["bound_on_fitted"] <= 0.1 and fit["n_lesion"] == 100
    assert np.mean(fnrs) <= 0.1 + 0.01 and np.mean(fnrs) > 0.05   # controlled, not trivially 0
    assert np.mean(fnr_half) > 0.15


def test_crc_refuses_too_few_lesion_images_and_skips_empty_masks():
    pc, mc = _seg(np.random.default_rng(0), 12)
    mc[:5] = 0                                 # 5 images without a lesion: no FNR, left out
    with pytest.raises(ValueError, match=r"7 calibration image\(s\) are too few for alpha=0.1"):
        cp.crc_fnr_threshold(pc, mc, 0.1)
    fit = cp.crc_fnr_threshold(pc, mc, 0.2)
    assert fit["n_lesion"] == 7 and fit["n_no_lesion"] == 5
