"""Patient splits never share a patient between splits and never move a patient when rows are added."""
from __future__ import annotations

import random
from collections import defaultdict

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from medtrust.data.records import DataError
from medtrust.data.splits import assign_patient_splits, carve_calibration, make_splits

# any unicode id (spaces, control characters, ":" which the hash joins with the seed); 1-4 images a patient
PATIENT_IDS = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=8)
COHORTS = st.dictionaries(PATIENT_IDS, st.integers(1, 4), min_size=1, max_size=40)  # patient id -> images


@st.composite
def fractions(draw) -> dict[str, float]:
    """train/val/test fractions summing to 1 (some may be 0), as ``data.splits.fractions``."""
    weights = draw(st.tuples(*[st.integers(0, 10)] * 3).map(lambda w: w if any(w) else (1, 0, 0)))
    return {s: w / sum(weights) for s, w in zip(("train", "val", "test"), weights)}


CAL_FRACTIONS = st.sampled_from([0.0, 0.0, 0.1, 0.25, 0.5])  # data.splits.calibration_fraction
SEEDS = st.integers(0, 2**32)


def records(cohort: dict[str, int], tag: str = "") -> list[dict]:
    """One record per image; ids unique across calls with different ``tag``s."""
    return [{"id": f"{tag}{i}/{k}", "patient_id": pid, "path": f"/data/{tag}{i}_{k}.png"}
            for i, (pid, n) in enumerate(cohort.items()) for k in range(n)]


def split_or_none(recs: list[dict], fr: dict[str, float], seed: int, cal: float) -> dict[str, str] | None:
    """``make_splits`` (computed, not source, splits) as patient -> split; ``None`` where the documented
    refusal applies (a calibration fraction that leaves train or cal without images)."""
    try:
        out, how = make_splits(recs, fr, seed, use_source=False, calibration_fraction=cal)
    except DataError as exc:
        assert cal > 0 and "calibration_fraction" in str(exc)
        train = [r for r in recs if assign_patient_splits([r["patient_id"]], fr, seed)[r["patient_id"]] == "train"]
        kept, carved = carve_calibration(train, cal, seed)
        assert not kept or not carved, "refused although train and cal both have images"
        event("calibration split refused (too few patients)")
        return None
    assert how == "patient_hash"
    placed = sorted(r["id"] for rs in out.values() for r in rs)
    assert placed == sorted(r["id"] for r in recs), "every record in exactly one split"
    where: dict[str, set[str]] = defaultdict(set)
    for split, rs in out.items():
        for r in rs:
            where[r["patient_id"]].add(split)
    leaked = {p: s for p, s in where.items() if len(s) > 1}
    assert not leaked, f"patients in several splits: {leaked}"
    return {p: s.pop() for p, s in where.items()}


@settings(max_examples=100)
@given(COHORTS, fractions(), SEEDS, CAL_FRACTIONS)
def test_no_patient_is_in_two_splits(cohort, fr, seed, cal):
    assign = split_or_none(records(cohort), fr, seed, cal)
    if assign is None:
        return
    for p, split in assign.items():
        assert split == "cal" or fr[split] > 0, f"{p!r} in {split}, whose fraction is 0"
        # a patient's split is a function of (seed, patient id) alone: the same when split on its own
        alone = assign_patient_splits([p], fr, seed)[p]
        assert split == alone or (split == "cal" and alone == "train"), (p, split, alone)


@settings(max_examples=100)
@given(COHORTS, COHORTS, fractions(), SEEDS, CAL_FRACTIONS, st.randoms(use_true_random=False))
def test_adding_rows_never_moves_an_existing_patient(old, new, fr, seed, cal, rnd: random.Random):
    """New patients (and more images of known patients) arrive, in any row order."""
    before = split_or_none(records(old), fr, seed, cal)
    if before is None:
        return
    grown = records(old) + records(new, tag="new")  # ``new`` may repeat old patient ids: more images of them
    rnd.shuffle(grown)
    after = split_or_none(grown, fr, seed, cal)
    assert after is not None, "growing the data made a valid calibration split invalid"
    moved = {p: (s, after[p]) for p, s in before.items() if after[p] != s}
    assert not moved, f"patients moved split when rows were added: {moved}"


@settings(max_examples=80)
@given(st.dictionaries(PATIENT_IDS, st.lists(st.sampled_from(["train", "val", "test"]), min_size=1, max_size=3),
                       min_size=1, max_size=20))
def test_source_splits_are_refused_exactly_when_they_leak(split_values):
    """Official splits (``use_source``) are kept as given unless a patient has rows in two splits."""
    recs = [{"id": f"{i}/{k}", "patient_id": pid, "split": s}
            for i, (pid, ss) in enumerate(split_values.items()) for k, s in enumerate(ss)]
    leaky = any(len(set(ss)) > 1 for ss in split_values.values())
    if leaky:
        with pytest.raises(DataError, match="patient leakage"):
            make_splits(recs, {"train": 0.7, "val": 0.15, "test": 0.15}, 0)
    else:
        out, how = make_splits(recs, {"train": 0.7, "val": 0.15, "test": 0.15}, 0)
        assert how == "source"
        assert {r["id"]: s for s, rs in out.items() for r in rs} == {r["id"]: r["split"] for r in recs}
