"""The generator's report rows and trust lines show how well the judge reads each modality's real images."""
from __future__ import annotations

from pathlib import Path

from medtrust.report.generation import JUDGE, generation_sections, generation_trust_lines


def _metrics(fundus_judge: float) -> dict:
    block = {"n_images": 4, "modality_accuracy": 1.0, "modality_accuracy_ci": [0.9, 1.0], "finding_accuracy": 0.9,
             "finding_accuracy_ci": [0.85, 0.95], "memorised_share": 0.0, "memorised_share_ci": [0.0, 0.0]}
    ev = {"accuracy_real_val": {"modality": 1.0, "finding": 0.9},
          "accuracy_real_val_modalities": {"cxr": {"modality": 1.0, "finding": 1.0, "n": 40},
                                           "fundus": {"modality": 1.0, "finding": fundus_judge, "n": 51}}}
    gen = {"overall": dict(block), "modalities": {"cxr": dict(block), "fundus": dict(block)}}
    return {"test": {"generation": gen, "evaluator": ev, "n_images": 8, "trust_thresholds": {"finding_accuracy_min": 0.8}}}


def test_judge_accuracy_per_modality_is_a_column_and_its_worst_modality_a_trust_line():
    m = _metrics(0.49)
    rows = generation_sections(Path("."), m)[0].context["per_split"]["test"]
    assert {r["group"]: r[JUDGE] for r in rows} == {"overall": 0.9, "cxr": 1.0, "fundus": 0.49}
    line = next(t for t in generation_trust_lines(Path("."), m) if "judge" in t.figure)
    assert "fundus" in line.figure and line.verdict == "fails" and line.reported_on == "real val images"
    ok = next(t for t in generation_trust_lines(Path("."), _metrics(0.96)) if "judge" in t.figure)
    assert ok.verdict == "meets" and "fundus" in ok.figure
