"""The HTML report embeds every figure and states intended use and limitations."""
from __future__ import annotations

import json

import numpy as np

from medtrust.report.figures import plot_confusion
from medtrust.report.html import build_run_report, dataset_licence


def test_report_is_self_contained(tmp_path):
    plot_confusion({"tp": 5, "fp": 1, "tn": 90, "fn": 4}, tmp_path / "figures" / "test" / "cm.png")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "test.json").write_text(json.dumps({
        "split": "test", "n_images": 12, "seg": {"dice": 0.8, "iou": 0.7}, "cal": {"ece": 0.05},
        "data": {"source": "phantom_derm(n=12)", "image_size": [32, 32]}}))
    html = build_run_report(tmp_path).read_text()
    assert html.count("data:image/png;base64,") == 1 and "src=\"figures" not in html
    assert "not a medical device" in html and "0.8000" in html
    assert "procedural phantom data" in html and "only 12 images" in html


def test_dataset_licence_is_read_from_readme(tmp_path):
    (tmp_path / "README.md").write_text("# x\n- **Licence**: CC BY 4.0.\n")
    (tmp_path / "manifest.csv").write_text("path\n")
    assert dataset_licence(str(tmp_path / "manifest.csv")) == "CC BY 4.0."
    assert dataset_licence(None) is None
