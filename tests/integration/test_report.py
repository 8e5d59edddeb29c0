"""The trust report opens in headless Chromium with no broken image (skips without Chromium)."""
from __future__ import annotations

import numpy as np
import pytest

from medtrust.report.browser import check_report, find_chromium, rendered_dom
from tests.conftest import run_script
from tests.reliability.matrix import csv_layout, write_image

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


def _payload(n: int) -> str:
    return f"document.documentElement.setAttribute('data-pwned','{n}')"


HOSTILE = {"sex": f"<script>{_payload(1)}</script>",
           "site": f'"><img src=x onerror="{_payload(2)}">',
           "patient_id": f"<svg onload={_payload(3)}>"}


def test_strings_from_data_cannot_run_in_the_report(tiny_run, tmp_path):
    """Manifest cells, attribute values and file names holding <script> and "><img onerror=...> reach the
    evaluation report escaped: rendered in headless Chromium, none of the payloads runs."""
    lay = csv_layout(tmp_path / "data")
    df = lay.read()
    for col, value in HOSTILE.items():
        df[col] = value if col != "patient_id" else [f"{value}{i // 2}" for i in range(len(df))]
    bad = lay.root / "images" / f"x\"><img src=y onerror={_payload(4)}>.png"  # a file name
    write_image(bad, np.full((16, 16, 3), 90, np.uint8))
    df.loc[df.index[df["split"] == "test"][0], "path"] = f"images/{bad.name}"
    lay.write(df)
    out = tmp_path / "eval"
    run_script("evaluate.py", f"run_dir={tiny_run}", "data=csv", f"data.manifest={lay.table}",
               "data.source.attr_columns=[sex,site]", f"hydra.run.dir={out}")
    html = (out / "report" / "index.html").read_text()
    assert "&lt;script&gt;" in html and "onerror" in html  # the strings reached the page ...
    for raw in ("<script>document", "<img src=x", "<img src=y", "<svg onload"):
        assert raw not in html  # ... escaped
    dom = rendered_dom(out / "report" / "index.html")
    assert "data-pwned=" not in dom.replace("'data-pwned'", ""), "a payload ran in the browser"

