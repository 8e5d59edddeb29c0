"""NIH ChestX-ray14 and CheXpert layouts: labels, patients, attributes and bad input."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medtrust.data.records import DataError
from medtrust.data.sources.cxr_tables import ChexpertSource, NihChestXray14Source, age_group
from tests.conftest import write_png

IMG = np.full((16, 16), 128, np.uint8)


def test_age_groups():
    assert [age_group(a, [40, 65]) for a in ("12", "40", "64", "065Y", "x")] == ["<40", "40-64", "40-64", ">=65", "unknown"]


def nih(tmp_path, rows):
    for r in rows:
        write_png(tmp_path / "images_001" / "images" / r[0], IMG)
    df = pd.DataFrame(rows, columns=["Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender",
                                     "View Position"])
    df.to_csv(tmp_path / "Data_Entry_2017.csv", index=False)
    return tmp_path / "Data_Entry_2017.csv"


def test_nih_labels_patients_and_official_test_list(tmp_path):
    t = nih(tmp_path, [("a.png", "Pneumonia|Effusion", "1", "70", "F", "PA"), ("b.png", "No Finding", "1", "70", "F", "AP"),
                       ("c.png", "Effusion", "2", "30", "M", "PA"), ("d.png", "Pneumonia", "3", "50", "M", "PA")])
    (tmp_path / "test_list.txt").write_text("d.png\n")
    recs = NihChestXray14Source(str(t), test_list=str(tmp_path / "test_list.txt")).records()
    assert [r["label"] for r in recs] == [1, 0, 0, 1]
    assert recs[0]["patient_id"] == recs[1]["patient_id"] == "nih_1" and recs[0]["attrs"]["age_group"] == ">=65"
    assert recs[3]["split"] == "test" and {r["split"] for r in recs[:3]} <= {"train", "val"}
    assert len(NihChestXray14Source(str(t), views=["PA"]).records()) == 3


def test_nih_bad_input(tmp_path):
    t = nih(tmp_path, [("a.png", "Pneumonia", "", "70", "F", "PA")])
    with pytest.raises(DataError, match="row 2: empty 'Patient ID'"):
        NihChestXray14Source(str(t)).records()
    pd.DataFrame({"Image Index": ["a.png"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match=r"missing column\(s\) \['Finding Labels'"):
        NihChestXray14Source(str(tmp_path / "bad.csv")).records()


def chexpert(tmp_path, values):
    rows = []
    for i, v in enumerate(values):
        rel = f"CheXpert-v1.0-small/train/patient{i // 2:05d}/study1/view{i}_frontal.jpg"
        write_png(tmp_path / rel, IMG)
        rows.append({"Path": rel, "Sex": "Female", "Age": "55", "Frontal/Lateral": "Frontal", "AP/PA": "PA", "Pneumonia": v})
    table = tmp_path / "CheXpert-v1.0-small" / "train.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    return table


@pytest.mark.parametrize("policy,labels", [("zeros", [1, 0, 0, 0]), ("ones", [1, 0, 1, 0]), ("ignore", [1, 0, 0])])
def test_chexpert_uncertain_policies(tmp_path, policy, labels):
    t = chexpert(tmp_path, ["1.0", "0.0", "-1.0", ""])
    recs = ChexpertSource(str(t), uncertain=policy).records()
    assert [r["label"] for r in recs] == labels
    assert recs[0]["patient_id"] == "patient00000" and "error" not in recs[0]
    # the id is the official Path relative to image_root (was '/' -> '_', which could merge two paths)
    assert recs[0]["id"] == "CheXpert-v1.0-small/train/patient00000/study1/view0_frontal.jpg"


def test_chexpert_uncertain_without_policy_names_the_row(tmp_path):
    t = chexpert(tmp_path, ["1.0", "-1.0"])
    with pytest.raises(DataError, match="row 3: uncertain label \\(-1\\) for 'Pneumonia' and no policy"):
        ChexpertSource(str(t)).records()
    with pytest.raises(ValueError, match="data.source.uncertain"):
        ChexpertSource(str(t), uncertain="maybe")
