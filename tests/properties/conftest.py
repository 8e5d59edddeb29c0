"""Hypothesis settings of the property tests: reproducible (derandomized), nothing written to the repository."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir

# Even without an example database Hypothesis caches things (source constants, unicode tables) in
# ./.hypothesis; keep them out of the working tree unless the caller chose a place.
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "medtrust-hypothesis")

# derandomize: the examples are a fixed function of each test, so a failure reproduces on every machine
# and run; database=None: no example database; deadline=None: the two shared CPU cores make single-example
# timings meaningless (the tests bound their cost with max_examples instead).
settings.register_profile("medtrust-properties", derandomize=True, database=None, deadline=None,
                          print_blob=True)
settings.load_profile("medtrust-properties")
