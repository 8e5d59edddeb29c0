"""Bootstrap CIs on scipy: agreement with the hand-written percentile bootstrap they replaced (kept
below as the reference), known truth (the CI of a normal mean), rows resampled together, and the
documented behaviour when resamples are undefined or the distribution is degenerate."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from medtrust.metrics.stats import BCA_MAX_N, bootstrap_ci, bootstrap_mean_ci


def _reference_bootstrap_ci(fn, *arrays, n_boot=1000, alpha=0.05, seed=0):
    """The implementation before scipy (percentile bootstrap, NaN resamples dropped), verbatim."""
    n = len(arrays[0])
    gen = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(n_boot):
        idx = torch.randint(0, n, (n,), generator=gen)
        v = fn(*(a[idx] for a in arrays))
        if np.isfinite(v):
            vals.append(v)
    if not vals:
        return float("nan"), float("nan")
    lo, hi = np.percentile(vals, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def _auroc(s: torch.Tensor, y: torch.Tensor) -> float:
    """Mann-Whitney AUROC (sklearn's roc_auc_score costs ~5 ms a call: too slow for 2000 resamples)."""
    s, y = s.numpy(), y.numpy().astype(bool)
    n1 = int(y.sum())
    if n1 in (0, len(y)):
        return float("nan")
    return float((rankdata(s)[y].sum() - n1 * (n1 + 1) / 2) / (n1 * (len(y) - n1)))


def test_the_test_auroc_is_sklearns():
    s, y = _scores(50)
    assert _auroc(s, y) == pytest.approx(roc_auc_score(y.numpy(), s.numpy()))


def _scores(n: int, n_pos: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=gen) if n_pos is None else (torch.arange(n) < n_pos).long()
    return (y + torch.randn(n, generator=gen)).sigmoid(), y


# Monte-Carlo s.d. of a 2.5 % / 97.5 % bound at 2000 resamples is ~0.0025 here (CI widths 0.05-0.11), so
# ~0.0035 for the difference of two independent runs, and BCa moves the bounds by O(skewness / n) against
# the percentile interval (measured: differences <= 0.003): 0.015 is ~4 s.d.
@pytest.mark.parametrize("method", ["BCa", "percentile"])
@pytest.mark.parametrize("stat", ["mean", "auroc"])
def test_bounds_match_the_old_percentile_bootstrap(method, stat):
    s, y = _scores(300)
    fn = (lambda a, b: float(a.mean())) if stat == "mean" else _auroc
    old = _reference_bootstrap_ci(fn, s, y, n_boot=2000)
    lo, hi, info = bootstrap_ci(fn, s, y, n_boot=2000, method=method, return_info=True)
    assert (lo, hi) == pytest.approx(old, abs=0.015) and info["method"] == method and info["fallback"] is None
    assert lo < fn(s, y) < hi


def test_bca_ci_of_a_normal_mean_is_mean_pm_1_96_over_sqrt_n():
    x = np.random.default_rng(0).normal(size=400)
    lo, hi = bootstrap_mean_ci(x, n_boot=2000, seed=1)
    # s.d. of the sample s.d. at n=400 is ~3.5 %, i.e. 0.0035 on the half-width 0.098
    assert lo == pytest.approx(x.mean() - 1.96 / 20, abs=0.01) and hi == pytest.approx(x.mean() + 1.96 / 20, abs=0.01)


def test_rows_of_all_arrays_are_resampled_together():
    x = torch.randn(50)
    assert bootstrap_ci(lambda a, b: float((a - b).mean()), x, x - 1, n_boot=100) == pytest.approx((1.0, 1.0))


def test_same_seed_same_ci_and_methods_are_validated():
    x = torch.randn(80)
    f = lambda a: float(a.mean())  # noqa: E731
    assert bootstrap_ci(f, x, seed=3) == bootstrap_ci(f, x, seed=3) != bootstrap_ci(f, x, seed=4)
    lo, hi = bootstrap_ci(f, x, method="basic", n_boot=500)
    assert lo < float(x.mean()) < hi
    with pytest.raises(ValueError, match=r"'studentized' is not one of \('BCa', 'percentile', 'basic'\)"):
        bootstrap_ci(f, x, method="studentized")


def test_a_few_undefined_resamples_fall_back_to_the_percentile_interval_of_the_finite_ones():
    s, y = _scores(30, n_pos=2)  # ~13 % of resamples have no positive: AUROC undefined, BCa NaN in scipy
    lo, hi, info = bootstrap_ci(_auroc, s, y, n_boot=2000, return_info=True)
    assert info["method"] == "percentile" and "undefined resamples" in info["fallback"]
    assert 0.75 * 2000 < info["n_finite"] < 0.95 * 2000
    assert 0 <= lo < _auroc(s, y) <= hi <= 1
    # the old implementation dropped the same resamples: same interval up to Monte-Carlo error (larger
    # here: a wide, discrete interval, two positives)
    assert (lo, hi) == pytest.approx(_reference_bootstrap_ci(_auroc, s, y, n_boot=2000), abs=0.05)


def test_mostly_undefined_resamples_give_no_ci():
    x = torch.randn(100)
    cut = float(x.mean()) + 0.05  # ~30 % of resample means exceed it
    lo, hi, info = bootstrap_ci(lambda a: float(a.mean()) if a.mean() > cut else float("nan"), x, n_boot=400,
                                return_info=True)
    assert np.isnan([lo, hi]).all() and info["fallback"].startswith("only")


def test_a_degenerate_distribution_gives_the_single_value():
    p, y = torch.ones(20, dtype=torch.long), torch.ones(20, dtype=torch.long)  # every resample: accuracy 1
    lo, hi, info = bootstrap_ci(lambda a, b: float((a == b).double().mean()), p, y, n_boot=200, return_info=True)
    assert (lo, hi) == (1.0, 1.0) and info["method"] == "percentile" and "degenerate" in info["fallback"]


def test_bca_is_replaced_by_percentile_above_bca_max_n():
    _, _, info = bootstrap_ci(lambda a: float(a.mean()), np.arange(BCA_MAX_N + 1) % 7.0,
                              n_boot=50, return_info=True)
    assert info["method"] == "percentile" and str(BCA_MAX_N) in info["fallback"]


def test_mean_ci_ignores_nan_entries():
    v = np.r_[np.random.default_rng(1).uniform(0.5, 0.9, 60), [np.nan] * 5]
    assert bootstrap_mean_ci(v, n_boot=300) == bootstrap_ci(lambda a: float(a.mean()), v[:60], n_boot=300)
    assert bootstrap_mean_ci(torch.as_tensor(v), n_boot=300) == bootstrap_mean_ci(v, n_boot=300)
    lo, hi = bootstrap_mean_ci(v, n_boot=300)
    assert lo < np.nanmean(v) < hi
    assert np.isnan(bootstrap_mean_ci([np.nan, np.nan])).all() and np.isnan(bootstrap_mean_ci([0.5])).all()
