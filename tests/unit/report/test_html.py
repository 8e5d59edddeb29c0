"""The HTML report: self-contained, autoescaped, opens with the task's trust summary, and shows
the sections a task brings through the contract (any metric group, its own templates)."""
from __future__ import annotations

import json

import pytest

from medtrust.report.figures import plot_confusion
from medtrust.report.html import build_run_report, dataset_licence
from medtrust.report.trust import subgroup_line, threshold_line
from medtrust.tasks.base import ReportSection, TaskBase, TrustLine


def _metrics(tmp_path, split="test", **extra):
    (tmp_path / "metrics").mkdir(exist_ok=True)
    m = {"split": split, "n_images": 12, "metric_groups": ["zz"], "zz": {"score": 0.8}, **extra,
         "data": {"source": "phantom_derm(n=12)", "image_size": [32, 32]}}
    (tmp_path / "metrics" / f"{split}.json").write_text(json.dumps(m))
    return m


class FakeTask(TaskBase):
    """A task whose metric group the report has never heard of, with its own section and line."""

    task_name = "fake"
    metric_group = "zz"

    @classmethod
    def report_sections(cls, run_dir, metrics):
        (run_dir / "tpl").mkdir(exist_ok=True)
        (run_dir / "tpl" / "fake.html.j2").write_text("<h2>Fake section</h2><p>{{ note }}</p>")
        return [ReportSection("fake.html.j2", {"note": "<script>alert(1)</script>"}, [run_dir / "tpl"])]

    @classmethod
    def trust_summary(cls, run_dir, metrics):
        m = metrics["test"]
        return [threshold_line("accuracy", "score", m["zz"]["score"], [0.7, 0.9], 0.5, True, ("good", "bad"),
                               "weights: train", "test (12 images)")]


def test_report_is_self_contained_and_shows_any_metric_group(tmp_path):
    plot_confusion({"tp": 5, "fp": 1, "tn": 90, "fn": 4}, tmp_path / "figures" / "test" / "cm.png")
    _metrics(tmp_path)
    html = build_run_report(tmp_path, task=FakeTask).read_text()
    assert html.count("data:image/png;base64,") == 1 and "src=\"figures" not in html
    assert "not a medical device" in html and "0.8000" in html and "zz/score" in html  # no seg/cls filter
    assert "procedural phantom data" in html and "only 12 images" in html
    assert "<h2>Fake section</h2>" in html  # the task's own template
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;" in html  # autoescape on
    trust = html.split("<h2>Trust summary</h2>")[1].split("<h2>")[0]
    assert "good: score 0.800 [0.700, 0.900] ≥ 0.5" in trust and "weights: train" in trust
    assert html.index("Trust summary") < html.index("<h2>Metrics</h2>")


def test_in_sample_figures_are_marked(tmp_path):
    _metrics(tmp_path, split="val", in_sample=["zz"])
    html = build_run_report(tmp_path, task=None).read_text()
    assert "in-sample" in html and "fitted on these same images" in html


@pytest.mark.parametrize("ci,verdict", [([0.01, 0.04], "meets"), ([0.06, 0.09], "fails"), ([0.03, 0.07], "inconclusive")])
def test_threshold_verdicts_use_the_whole_ci(ci, verdict):
    line = threshold_line("calibration", "ECE", sum(ci) / 2, ci, 0.05, False, ("calibrated", "not calibrated"), "cal", "test")
    assert isinstance(line, TrustLine) and line.verdict == verdict
    if verdict == "meets":
        assert line.text.startswith("calibrated: ECE") and "≤ 0.05" in line.text
    in_sample = threshold_line("calibration", "ECE", 0.02, [0.01, 0.03], 0.05, False, ("c", "n"), "val", "val", in_sample=True)
    assert in_sample.verdict == "in-sample" and "calibrated" not in in_sample.text and "no verdict" in in_sample.text


def test_subgroup_line_needs_size_and_significance():
    def sub(gap, p):
        return {"subgroups": {"attributes": {"sex": {"gaps": {"tpr": {"gap": gap, "p_value": p, "ci95": [0.0, 0.3],
                                                                      "highest": "M", "lowest": "F"}}}}}}
    assert subgroup_line(sub(0.27, 0.01), ["tpr"], 0.1, 0.05, "test").verdict == "fails"
    assert subgroup_line(sub(0.27, 0.2), ["tpr"], 0.1, 0.05, "test").verdict == "inconclusive"
    assert subgroup_line(sub(0.05, 0.01), ["tpr"], 0.1, 0.05, "test").verdict == "meets"
    assert subgroup_line({}, ["tpr"], 0.1, 0.05, "test").verdict == "not measured"


def test_dataset_licence_is_read_from_readme(tmp_path):
    (tmp_path / "README.md").write_text("# x\n- **Licence**: CC BY 4.0.\n")
    (tmp_path / "manifest.csv").write_text("path\n")
    assert dataset_licence(str(tmp_path / "manifest.csv")) == "CC BY 4.0."
    assert dataset_licence(None) is None
