"""Ratings of generated images (the selector's data) and the generate.py output as a source."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medtrust.data.datamodule import ImageDataModule
from medtrust.data.records import DataError
from medtrust.data.sources.generated import GeneratedSource, attribute_columns, read_generated
from medtrust.data.sources.ratings import RatingsSource, krippendorff_alpha


def _generated_folder(tmp_path, n_rows=4, per_row=2, with_reward=True):
    """A folder as generate.py writes it: images/ + generated.csv (prompt CSV columns sex, age_group)."""
    out = tmp_path / "gen"
    (out / "images").mkdir(parents=True)
    rows = []
    rng = np.random.default_rng(0)
    for r in range(n_rows):
        for s in range(per_row):
            f = f"images/r{r:06d}_s{s:03d}_seed{10 * r + s}.png"
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(out / f)
            rows.append({"file": f, "row": r, "sample": s, "prompt": f"chest X-ray: case {r}",
                         "modality": "cxr" if r % 2 == 0 else "ct", "seed": 10 * r + s,
                         "sex": "F" if r < 2 else "M", "age_group": "<40", "label": r % 3,
                         "sampler": "ddim", "steps": 5, "guidance": 5.0, "run_dir": "/x", "checkpoint": "/x/best.ckpt",
                         "shard": 0, "n_shards": 1, **({"selector_score": 1.0 + r * 0.5} if with_reward else {})})
    pd.DataFrame(rows).to_csv(out / "generated.csv", index=False)
    return out


def _ratings(tmp_path, rows, header="path,rating,rater"):
    p = tmp_path / "ratings.csv"
    p.write_text(header + "\n" + "\n".join(rows) + "\n")
    return p


def test_mean_of_raters_is_the_label_and_the_generated_csv_gives_group_and_attributes(tmp_path):
    gen = _generated_folder(tmp_path)
    rows = ["images/r000000_s000_seed0.png,3,a", "images/r000000_s000_seed0.png,2,b",   # mean 2.5 -> 3 (half up)
            "images/r000001_s001_seed11.png,1,a", "images/r000001_s001_seed11.png,2,b",  # 1.5 -> 2
            "images/r000002_s000_seed20.png,1,a"]                                         # one rater
    src = RatingsSource(str(_ratings(tmp_path, rows)), images=str(gen))
    recs = {r["id"]: r for r in src.records()}
    assert recs["images/r000000_s000_seed0.png"]["label"] == 2          # rating 3 -> class 2
    assert recs["images/r000001_s001_seed11.png"]["label"] == 1
    assert recs["images/r000002_s000_seed20.png"]["label"] == 0
    r1 = recs["images/r000001_s001_seed11.png"]
    assert r1["patient_id"] == "prompt1" and r1["attrs"] == {"modality": "ct", "sex": "F", "age_group": "<40"}
    assert src.counts["n_images"] == 3 and src.counts["n_ratings"] == 5 and src.counts["n_raters"] == 2
    assert src.summary()["ratings"]["agreement"]["n_pairable"] == 2
    assert src.counts["images_by_attribute"] == {"age_group": {"<40": 3}, "modality": {"ct": 1, "cxr": 2},
                                                 "sex": {"F": 2, "M": 1}}


def test_each_rating_is_a_sample_and_an_images_ratings_share_one_group(tmp_path):
    gen = _generated_folder(tmp_path)
    rows = ["images/r000000_s000_seed0.png,3,a", "images/r000000_s000_seed0.png,2,b"]
    recs = RatingsSource(str(_ratings(tmp_path, rows)), images=str(gen), aggregate="each").records()
    assert sorted(r["label"] for r in recs) == [1, 2]
    assert {r["patient_id"] for r in recs} == {"prompt0"} and {r["attrs"]["rater"] for r in recs} == {"a", "b"}
    assert len({r["id"] for r in recs}) == 2


def test_krippendorff_alpha_matches_the_package_and_its_limits():
    import krippendorff

    long = pd.DataFrame({"image": [0, 1, 2, 3, 0, 1, 2, 3], "rater": ["a"] * 4 + ["b"] * 4,
                         "rating": [1, 2, 3, 3, 1, 2, 3, 1]})
    a = krippendorff_alpha(long, n_boot=50)
    expected = krippendorff.alpha(reliability_data=np.array([[1, 2, 3, 3], [1, 2, 3, 1]], float),
                                  level_of_measurement="ordinal")
    assert a["alpha"] == pytest.approx(expected) and a["n_raters"] == 2
    same = krippendorff_alpha(long.assign(rating=np.tile([1, 2, 3, 3], 2)), n_boot=50)
    assert same["alpha"] == pytest.approx(1.0) and same["ci95"] == [1.0, 1.0]
    one = krippendorff_alpha(long[long["rater"] == "a"])
    assert one["alpha"] is None and one["reason"] == "one rater"


def test_ratings_without_a_generated_csv_need_the_files_and_have_no_attributes(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    recs = RatingsSource(str(_ratings(tmp_path, ["a.png,2"], "path,rating"))).records()
    assert len(recs) == 1 and recs[0]["label"] == 1 and recs[0]["attrs"] == {} and recs[0]["patient_id"] == "a.png"
    with pytest.raises(DataError, match=r"ratings.csv row 3: unknown image path 'b.png': no file"):
        RatingsSource(str(_ratings(tmp_path, ["a.png,2", "b.png,2"], "path,rating"))).records()


@pytest.mark.parametrize("rows,header,message", [
    (["images/nope.png,2,a"], "path,rating,rater", r"row 2: unknown image path 'images/nope.png': not an image of the generate.py CSV"),
    (["images/r000000_s000_seed0.png,4,a"], "path,rating,rater", r"row 2: rating 4 is outside the scale 1-3"),
    (["images/r000000_s000_seed0.png,0,a"], "path,rating,rater", r"row 2: rating 0 is outside the scale 1-3"),
    (["images/r000000_s000_seed0.png,2.5,a"], "path,rating,rater", r"row 2: rating '2.5' is not an integer; expected an integer rating 1-3"),
    (["images/r000000_s000_seed0.png,,a"], "path,rating,rater", r"row 2: rating '' is not an integer"),
    (["images/r000000_s000_seed0.png,good,a"], "path,rating,rater", r"row 2: rating 'good' is not an integer"),
    ([",2,a"], "path,rating,rater", r"row 2: empty 'path' cell"),
    (["images/r000000_s000_seed0.png,2,"], "path,rating,rater", r"row 2: empty 'rater' cell"),
    (["images/r000000_s000_seed0.png,2,a", "images/r000000_s000_seed0.png,3,a"], "path,rating,rater",
     r"row 3: a rated 'images/r000000_s000_seed0.png' already in row 2"),
    (["images/r000000_s000_seed0.png,2"], "path,score", r"missing column\(s\) \['rating'\].*expected path,rating\[,rater\]"),
    (["2,a"], "rating,rater", r"missing column\(s\) \['path'\]"),
    ([], "path,rating,rater", r"no ratings \(only a header\)"),
])
def test_bad_ratings_stop_with_the_row_and_what_was_expected(tmp_path, rows, header, message):
    gen = _generated_folder(tmp_path)
    with pytest.raises(DataError, match=message):
        RatingsSource(str(_ratings(tmp_path, rows, header)), images=str(gen)).records()


def test_missing_or_empty_ratings_file_and_bad_scale(tmp_path):
    with pytest.raises(DataError, match="ratings file not found"):
        RatingsSource(str(tmp_path / "none.csv")).records()
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="the file is empty"):
        RatingsSource(str(tmp_path / "empty.csv")).records()
    with pytest.raises(ValueError, match="lowest < highest"):
        RatingsSource(str(tmp_path / "x.csv"), scale=[3, 1])
    with pytest.raises(ValueError, match="aggregate='vote'"):
        RatingsSource(str(tmp_path / "x.csv"), aggregate="vote")


def test_datamodule_over_ratings_reports_agreement_and_keeps_prompts_in_one_split(tmp_path):
    gen = _generated_folder(tmp_path, n_rows=12, per_row=2)
    table = read_generated(gen)
    rng = np.random.default_rng(1)
    rows = [f"{f},{int(rng.integers(1, 4))},{r}" for f in table["file"] for r in ("a", "b")]
    dm = ImageDataModule(RatingsSource(str(_ratings(tmp_path, rows)), images=str(gen)), image_size=16,
                         channels=3, require_mask=False, require_label=True, num_classes=3)
    dm.setup("fit")
    summary = dm.summary()
    assert summary["ratings"]["n_raters"] == 2 and summary["ratings"]["agreement"]["alpha"] is not None
    split_of = {}
    for split, recs in dm.split_records.items():
        for r in recs:
            assert split_of.setdefault(r["patient_id"], split) == split  # the two samples of a prompt together
    batch = next(iter(dm.dataloader("train")))
    assert set(batch["attrs"]) == {"modality", "sex", "age_group"}


def test_generated_source_gives_prompt_modality_reward_and_attributes(tmp_path):
    gen = _generated_folder(tmp_path, n_rows=3, per_row=2)
    src = GeneratedSource(str(gen), ["cxr", "ct"], reward_column="selector_score")
    recs = src.records()
    assert len(recs) == 6
    r = recs[2]  # row 1, sample 0
    assert r["text"] == "chest X-ray: case 1" and r["modality"] == 1 and r["reward"] == 1.5
    assert r["patient_id"] == "prompt1" and r["label"] == 1 and r["attrs"]["sex"] == "F"
    assert "selector_score" not in r["attrs"] and "label" not in r["attrs"]
    assert attribute_columns(read_generated(gen)) == ["sex", "age_group"]
    with pytest.raises(DataError, match=r"modality 'ct' is not one of data.modalities \['cxr'\]"):
        GeneratedSource(str(gen), ["cxr"]).records()
    with pytest.raises(DataError, match="no column 'selector_score'.*selector_run"):
        GeneratedSource(str(_generated_folder(tmp_path / "b", with_reward=False)), ["cxr", "ct"],
                        reward_column="selector_score").records()
