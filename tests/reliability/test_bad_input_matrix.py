"""The bad-input matrix (tests/reliability/matrix.py): each case ends as it must -- a clear error naming the file,
row or key, a counted skip under data.on_bad=skip, or the unusual-but-valid input read as meant."""
from __future__ import annotations

import pytest

from tests.reliability.matrix import CASES, LAYOUTS, run


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case, tmp_path):
    assert run(case, tmp_path) == case.outcome


def test_the_matrix_covers_every_source_and_outcome():
    assert {c.source for c in CASES} == set(LAYOUTS)
    assert {c.outcome for c in CASES} == {"error", "skip", "read"}
    assert len({c.id for c in CASES}) == len(CASES)
