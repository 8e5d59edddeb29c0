"""The artifact benchmark (SAFEGEN): exact masks, severity, reproducibility, bad input."""
from __future__ import annotations

import numpy as np
import pytest

from medtrust.data.artifacts import COHORTS, ArtifactSpec, build_benchmark, inject
from medtrust.data.phantoms import seeded_rng
from medtrust.data.phantoms.cxr import render_cxr


def _cxr(i: int, size: int = 64) -> np.ndarray:
    img, _ = render_cxr(0, i, size, pneumonia=False, covid=False)
    return img.astype(np.float32) / 255.0


KINDS = [(c, k) for c, kinds in COHORTS.items() for k in kinds]


@pytest.mark.parametrize("cohort,kind", KINDS)
@pytest.mark.parametrize("channels", [0, 3])
def test_every_kind_changes_only_the_pixels_of_its_mask(cohort, kind, channels):
    img = _cxr(1)
    if channels:
        img = np.repeat(img[..., None], channels, axis=2) * np.array([1.0, 0.9, 0.8], np.float32)
    for sev in (1, 5):
        inj = inject(img, cohort, sev, seeded_rng("t", cohort, kind, sev), kind=kind)
        assert inj.image.shape == img.shape and inj.image.dtype == img.dtype and inj.mask.shape == img.shape[:2]
        assert inj.mask.dtype == bool and inj.mask.sum() >= 4 and (inj.kind, inj.severity) == (kind, sev)
        outside = ~inj.mask
        assert np.array_equal(inj.image[outside], img[outside])  # bit-identical outside the mask
        diff = inj.image != img
        changed = diff if img.ndim == 2 else diff.any(axis=2)
        assert np.array_equal(changed, inj.mask)  # and every mask pixel changed
        assert 0 <= inj.image.min() and inj.image.max() <= 1


@pytest.mark.parametrize("cohort,kind", KINDS)
def test_a_higher_severity_changes_the_image_more_in_every_kind(cohort, kind):
    imgs = [_cxr(i) for i in range(8)]

    def change(sev: int) -> float:  # total absolute change, averaged over images
        return float(np.mean([np.abs(inject(img, cohort, sev, seeded_rng("sev", kind, i), kind=kind).image - img).sum()
                              for i, img in enumerate(imgs)]))

    values = [change(s) for s in (1, 2, 3, 4, 5)]
    assert all(a < b for a, b in zip(values, values[1:])), values


@pytest.mark.parametrize("cohort", list(COHORTS))
def test_severity_orders_the_change_whatever_the_content(cohort):
    """Severity is a rank of the change an injection makes, across kinds and source images: its Spearman
    correlation with the total change is high in every cohort (the benchmark's ρ(score, severity) can
    only be as high as this), and each injection records its change."""
    from scipy.stats import spearmanr

    imgs = [_cxr(i) for i in range(10)]
    change, sev = [], []
    for s in (1, 2, 3, 4, 5):
        for d in range(8):
            rng = seeded_rng("order", cohort, s, d)
            img = imgs[int(rng.integers(len(imgs)))]
            inj = inject(img, cohort, s, rng)
            assert inj.params["change"] == pytest.approx(float(np.abs(inj.image.astype(float) - img).sum()))
            change.append(inj.params["change"])
            sev.append(s)
    assert spearmanr(change, sev).statistic > 0.8


def test_one_candidate_keeps_the_first_draw_and_more_candidates_spread_the_change():
    img = _cxr(3)
    first = inject(img, "displaced", 3, seeded_rng("c"), kind="displace", candidates=1)
    again = inject(img, "displaced", 3, seeded_rng("c"), kind="displace", candidates=1)
    assert np.array_equal(first.image, again.image)
    lo = inject(img, "displaced", 1, seeded_rng("c5"), kind="displace", candidates=5).params["change"]
    with pytest.raises(ValueError, match="candidates=0"):
        inject(img, "displaced", 1, seeded_rng("c5"), candidates=0)
    # with the same parameters drawn, severity 1 keeps the smallest of the five changes
    assert lo <= inject(img, "displaced", 1, seeded_rng("c5"), kind="displace", candidates=1).params["change"] + 1e-9


def test_the_benchmark_is_reproducible_from_its_seed_and_counts_its_cells():
    imgs = [_cxr(i, 32) for i in range(6)]
    spec = ArtifactSpec.from_config({"cohorts": ["noise", "extreme"], "severities": [1, 5], "per_severity": 3,
                                     "n_clean": 4, "seed": 7})
    a, b = build_benchmark(imgs, spec), build_benchmark(imgs, spec)
    assert len(a) == 4 + 2 * 2 * 3
    assert [r["id"] for r in a] == [r["id"] for r in b]
    assert all(np.array_equal(x["image"], y["image"]) and np.array_equal(x["mask"], y["mask"]) for x, y in zip(a, b))
    clean = [r for r in a if r["label"] == 0]
    assert len(clean) == 4 and all(r["cohort"] == "clean" and r["severity"] == 0 and not r["mask"].any() for r in clean)
    assert len({r["source"] for r in clean}) == 4  # 4 different clean images
    pos = [r for r in a if r["label"] == 1]
    assert {(r["cohort"], r["severity"]) for r in pos} == {("noise", 1), ("noise", 5), ("extreme", 1), ("extreme", 5)}
    assert all(r["mask"].any() for r in pos)
    other = build_benchmark(imgs, ArtifactSpec(**{**spec.__dict__, "seed": 8}))
    assert any(not np.array_equal(x["image"], y["image"]) for x, y in zip(a, other) if x["label"])


@pytest.mark.parametrize("cfg,msg", [
    ({"cohorts": ["displaced", "blur"]}, "artifacts.cohorts: unknown cohort(s) ['blur']"),
    ({"severities": [0, 3]}, "artifacts.severities: expected integers 1-5"),
    ({"per_severity": 0}, "artifacts.per_severity"),
    ({"n_clean": -1}, "artifacts.n_clean"),
    ({"severity": [1]}, "unknown key(s) ['severity']"),
])
def test_bad_benchmark_configs_name_the_key(cfg, msg):
    with pytest.raises(ValueError) as err:
        ArtifactSpec.from_config(cfg)
    assert msg in str(err.value)


def test_bad_injections_are_refused_with_a_message():
    img = _cxr(0, 32)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown artifact cohort 'blur'"):
        inject(img, "blur", 1, rng)
    with pytest.raises(ValueError, match="severity must be an integer 1-5"):
        inject(img, "noise", 6, rng)
    with pytest.raises(ValueError, match="unknown kind 'stripes' of cohort 'extreme'"):
        inject(img, "extreme", 1, rng, kind="stripes")
    with pytest.raises(ValueError, match="float image"):
        inject((img * 255).astype(np.uint8), "noise", 1, rng)
    with pytest.raises(ValueError, match="finite values in"):
        inject(np.full_like(img, np.nan), "noise", 1, rng)
    with pytest.raises(ValueError, match="fewer than 4 pixels"):  # a flat image: a displaced patch changes nothing
        inject(np.full_like(img, 0.5), "displaced", 3, rng)
    with pytest.raises(ValueError, match="split is empty"):
        build_benchmark([], ArtifactSpec())
