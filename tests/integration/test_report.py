"""The trust report opens in headless Chromium with no broken image (skips without Chromium)."""
from __future__ import annotations

import pytest

from medtrust.report.browser import check_report, find_chromium
from tests.conftest import run_script

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(find_chromium() is None, reason="needs Debian's chromium (.ci/run installs it)")]


def test_run_and_compare_reports_render_without_broken_images(tiny_run, tmp_path):
    page = (tiny_run / "report" / "index.html").read_text()
    assert "lowest-Dice images" in page and "Subgroups (test)" in page  # failure cases + per-group table
    res = check_report(tiny_run / "report" / "index.html", tmp_path / "run.png")
    assert res["images"] >= 5 and res["broken"] == 0
    assert (tmp_path / "run.png").stat().st_size > 10_000  # a real page, not a blank screenshot
    out = tmp_path / "cmp"
    run_script("evaluate.py", f"run_dirs=[{tiny_run},{tiny_run}]", "report=compare", f"hydra.run.dir={out}")
    html = (out / "report" / "index.html").read_text()
    assert "Comparison" in html and "not a medical device" in html and "Known limitations" in html
    res = check_report(out / "report" / "index.html", tmp_path / "cmp.png")
    assert res["images"] >= 1 and res["broken"] == 0
