"""Binned pixel PR curve equals torchmetrics' binned mode, streams, and stays O(pixels) in memory."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torchmetrics.functional.classification import binary_average_precision, binary_precision_recall_curve

from medtrust.metrics.segmentation import BinnedPRMetric, binned_pr_curve, pr_histogram, pr_thresholds

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def nondeterministic():
    """torchmetrics' reference is only affordable with deterministic algorithms off (the point of
    :func:`binned_pr_curve`); restore whatever the session had."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    yield
    torch.use_deterministic_algorithms(was)


def reference(probs: torch.Tensor, target: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
    t = (target > 0.5).long()
    precision, recall, thresholds = binary_precision_recall_curve(probs, t, thresholds=n)
    ap = binary_average_precision(probs, t, thresholds=n)
    return {"precision": precision, "recall": recall, "thresholds": thresholds, "average_precision": ap}


def assert_same(got: dict, want: dict, atol: float = 1e-6) -> None:
    assert got["precision"].shape == want["precision"].shape == (len(want["thresholds"]) + 1,)
    assert got["recall"].shape == want["recall"].shape
    assert torch.equal(got["thresholds"], want["thresholds"])
    for k in ("precision", "recall", "average_precision"):
        torch.testing.assert_close(got[k].double(), want[k].double(), atol=atol, rtol=0, equal_nan=True, msg=k)


def _random(seed: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(shape, generator=g)
    target = (torch.rand(shape, generator=g) < probs).float()
    return probs, target


@pytest.mark.parametrize(("seed", "shape", "n"), [(0, (4, 1, 32, 32), 101), (1, (3000,), 11), (2, (2, 1, 8, 8), 2)])
def test_equals_torchmetrics_on_random_inputs(nondeterministic, seed, shape, n):
    probs, target = _random(seed, shape)
    assert_same(binned_pr_curve(probs, target, n), reference(probs, target, n))


TM_THR = torch.linspace(0, 1, 11)  # float32 thresholds exactly as torchmetrics builds them


@pytest.mark.parametrize(("probs", "target"), [
    pytest.param(torch.rand(500), torch.zeros(500), id="no-positives"),  # recall NaN, AP 0
    pytest.param(torch.rand(500), torch.ones(500), id="all-positives"),
    pytest.param(torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0]),
                 id="exactly-0-and-1"),
    pytest.param(TM_THR.repeat(3), (torch.arange(33) % 2).float(), id="exactly-on-thresholds"),
    pytest.param(TM_THR.double(), (torch.arange(11) % 3 == 0).double(), id="float64-on-float32-thresholds"),
    pytest.param(torch.full((50,), 0.35), (torch.arange(50) < 20).float(), id="all-tied"),
])
def test_equals_torchmetrics_on_edge_cases(nondeterministic, probs, target):
    assert_same(binned_pr_curve(probs, target, 11), reference(probs, target, 11))


def test_hand_computed_curve():
    # thresholds 0, 0.5, 1: at 0 all 4 positive (tp 2 fp 2), at 0.5 {0.5, 0.9} (tp 1 fp 1), at 1 nothing
    probs, target = torch.tensor([0.1, 0.5, 0.9, 0.2]), torch.tensor([0.0, 0.0, 1.0, 1.0])
    out = binned_pr_curve(probs, target, 3)
    assert out["thresholds"].tolist() == [0.0, 0.5, 1.0]
    want_precision = torch.tensor([0.5, 0.5, float("nan"), 1.0], dtype=torch.float64)
    torch.testing.assert_close(out["precision"], want_precision, equal_nan=True)
    assert out["recall"].tolist() == [1.0, 0.5, 0.0, 0.0]
    assert float(out["average_precision"]) == pytest.approx(0.5 * 0.5 + 0.5 * 0.5)
    assert pr_histogram(probs, target, pr_thresholds(3)).tolist() == [[0, 1, 1, 0], [0, 1, 1, 0]]


def test_streaming_in_batches_equals_one_call():
    probs, target = _random(3, (10, 1, 16, 16))
    probs[0, 0, 0, :4] = torch.tensor([0.0, 1.0, 0.5, 0.25])
    metric = BinnedPRMetric(21)
    for i in range(0, 10, 3):  # last batch has one image
        metric.update(probs[i:i + 3], target[i:i + 3])
    got, want = metric.compute(), binned_pr_curve(probs, target, 21)
    for k in ("precision", "recall", "thresholds", "average_precision"):
        torch.testing.assert_close(got[k], want[k], atol=0, rtol=0, equal_nan=True, msg=k)
    assert metric.hist.shape == (2, 22) and int(metric.hist.sum()) == probs.numel()
    metric.reset()
    assert int(metric.hist.sum()) == 0


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        binned_pr_curve(torch.tensor([0.2, 1.5]), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        binned_pr_curve(torch.tensor([0.2, float("nan")]), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        binned_pr_curve(torch.rand(4), torch.zeros(5))
    with pytest.raises(ValueError, match="n_thresholds"):
        binned_pr_curve(torch.rand(4), torch.zeros(4), 1)
    with pytest.raises(ValueError, match="n_thresholds"):
        BinnedPRMetric(0)


def test_readme_smoke_split_under_deterministic_algorithms():
    """46 images of 32×32 (47,104 pixels, torchmetrics' vectorised path): torchmetrics allocates
    pixels × 404 int64 (15 GB) here; ours is a bincount of 47,104 codes."""
    probs, target = _random(4, (46, 1, 32, 32))
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        got = binned_pr_curve(probs, target, 101)
    finally:
        torch.use_deterministic_algorithms(was)
    torch.use_deterministic_algorithms(False)
    try:
        assert_same(got, reference(probs, target, 101))
    finally:
        torch.use_deterministic_algorithms(was)


MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, torch
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    from medtrust.metrics.segmentation import binned_pr_curve
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(2_000_000, generator=g)
    target = (torch.rand(2_000_000, generator=g) < probs).float()
    binned_pr_curve(probs[:1000], target[:1000])  # warm up kernels before the baseline
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = binned_pr_curve(probs, target, 101)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_increase_mb": (after - before) / 1024, "ap": float(out["average_precision"])}))
""")


def test_memory_is_linear_in_pixels_not_pixels_times_bins():
    """Peak RSS growth for 2,000,000 pixels, in a fresh process (``ru_maxrss`` is a per-process
    high-water mark, in KiB on Linux). Ours needs ~9 bytes a pixel (an int64 index and a bool
    target: ~18 MB). Any pixels × 101 intermediate needs at least 202 MB (bool), 1.6 GB (int64,
    torchmetrics' vectorised path) or 6.5 GB (× 404 int64, its deterministic bincount), so the
    100 MB bound fails for all of them."""
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["peak_increase_mb"] < 100, res
    assert 0.5 < res["ap"] < 1.0  # calibrated random scores: AP ~ 2/3
