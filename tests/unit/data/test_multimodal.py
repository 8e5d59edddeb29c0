"""The generator's data: multimodal phantom truth, prompts, letterboxing and the image-text CSV."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from medtrust.data.datamodule import ImageDataModule
from medtrust.data.phantoms.multimodal import MODALITIES, RADIOLOGICAL, PhantomMultimodalSource
from medtrust.data.prompts import PromptAugmenter, finding_fields, render_prompt, template_text
from medtrust.data.records import DataError, load_record, pad_to_aspect
from medtrust.data.sources.text_csv import TextCsvSource

MODS = list(MODALITIES)


@pytest.fixture(scope="module")
def records():
    return PhantomMultimodalSource(n_images=60, size=48, seed=3).records()


def test_phantom_text_says_what_is_drawn(records):
    assert {r["modality"] for r in records} == set(range(5))
    for r in records:
        m = MODS[r["modality"]]
        info = MODALITIES[m]
        assert r["text"].startswith(info["display"] + ":")
        if r["label"] == 0:
            assert r["mask"].sum() == 0 and f"no {info['finding']}" in r["text"]
            assert r["attrs"]["finding"] == "absent"
            continue
        side = "left" if r["label"] == 1 else "right"
        assert f"in the {side} " in r["text"] and r["attrs"]["side"] == side
        assert r["attrs"]["size"] in r["text"]
        # the lesion is drawn on the named side: radiological convention for CXR/CT/MRI
        ys, xs = np.nonzero(r["mask"])
        assert len(xs) > 0
        on_image_left = xs.mean() < r["mask"].shape[1] / 2
        named_left = side == "left"
        assert on_image_left == (named_left != (m in RADIOLOGICAL)), (r["id"], r["text"])
        assert r["attrs"]["sex"] in ("F", "M") and r["attrs"]["age_group"] in ("<40", "40-65", ">65")


def test_phantom_large_findings_are_larger(records):
    area = {s: [r["mask"].sum() for r in records if r["attrs"]["size"] == s] for s in ("small", "large")}
    assert np.mean(area["large"]) > 2 * np.mean(area["small"])


def test_phantom_image_depends_only_on_seed_and_index(records):
    again = PhantomMultimodalSource(n_images=25, size=48, seed=3).records()
    for a, b in zip(records[:25], again):
        assert a["text"] == b["text"] and np.array_equal(a["image"], b["image"])
    other = PhantomMultimodalSource(n_images=25, size=48, seed=4).records()
    assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(again, other))


def test_phantom_modalities_are_distinguishable(records):
    # fundus is colour, the others grey; the mean intensity separates the grey ones roughly
    for r in records:
        img = r["image"].astype(int)
        grey = np.array_equal(img[..., 0], img[..., 1])
        assert grey == (MODS[r["modality"]] != "fundus")


def test_phantom_bad_config_named():
    with pytest.raises(ValueError, match="data.modalities"):
        PhantomMultimodalSource(modalities=["cxr", "ultrasound"])
    with pytest.raises(ValueError, match="unknown field"):
        PhantomMultimodalSource(template="{modality} {colour}")


def test_templates():
    f = finding_fields("chest X-ray", "opacity", True, "right", "lower lung", "large", "F", 54)
    assert render_prompt("short", f) == "chest X-ray: large opacity in the right lower lung"
    report = render_prompt("report", f)
    assert report.index("History") < report.index("Technique") < report.index("Findings") < report.index("Impression")
    assert "54-year-old woman" in report
    assert render_prompt("short", finding_fields("brain MRI", "lesion", False)) == "brain MRI: no lesion"
    assert template_text("{modality} with {findings}") == "{modality} with {findings}"
    with pytest.raises(ValueError, match="unknown field"):
        template_text("{nope}")


def test_augmenter_is_seeded_and_keeps_the_first_clauses():
    text = "chest X-ray: large opacity in the right lower lung, female, 54 years, PA view"
    a1, a2 = PromptAugmenter(seed=1, p_synonym=1.0, p_shuffle=1.0, p_drop=0.3), PromptAugmenter(
        seed=1, p_synonym=1.0, p_shuffle=1.0, p_drop=0.3)
    draws1, draws2 = [a1(text, 7) for _ in range(5)], [a2(text, 7) for _ in range(5)]
    assert draws1 == draws2 and len(set(draws1)) > 1  # same seed, same draws; draws differ
    for d in draws1:
        assert "right" in d and ("big" in d or "extensive" in d) and "large" not in d
        assert "chest X-ray" not in d  # p_synonym=1 replaces it
    assert PromptAugmenter(p_synonym=0, p_shuffle=0, p_drop=0)(text, 0) == text
    assert PromptAugmenter(enabled=False, p_synonym=1)(text, 0) == text
    with pytest.raises(ValueError, match="p_drop"):
        PromptAugmenter(p_drop=2)


def test_pad_keeps_aspect_ratio():
    wide = np.full((20, 40, 3), 200, np.uint8)
    padded = pad_to_aspect(wide, (32, 32))
    assert padded.shape == (40, 40, 3) and padded[:10].max() == 0 and padded[10:30].min() == 200
    img, mask = load_record({"id": "a", "path": "a", "image": wide, "mask": np.ones((20, 40), np.uint8)},
                            (32, 32), 3, False, resize="pad")
    assert img.shape == (3, 32, 32) and img[:, :6].max() == 0 and img[:, 10:22].min() > 150
    assert mask[0, :6].max() == 0 and mask[0, 10:22].min() == 1
    stretched, _ = load_record({"id": "a", "path": "a", "image": wide}, (32, 32), 3, False)
    assert stretched.min() == 200


def _write_manifest(tmp_path, rows, name="m.csv", **kw):
    for r in rows:
        if r.get("path") and not r["path"].startswith("missing"):
            Image.fromarray(np.full((30, 40, 3), 90, np.uint8)).save(tmp_path / r["path"])
    pd.DataFrame(rows).to_csv(tmp_path / name, index=False, **kw)
    return tmp_path / name


def _rows(n=6):
    return [{"path": f"i{i}.png", "text": f"chest X-ray: finding {i}", "modal": ["cxr", "fundus"][i % 2],
             "label": i % 3, "patient_id": f"p{i}", "sex": "FM"[i % 2]} for i in range(n)]


def test_text_csv_chunked_records(tmp_path):
    path = _write_manifest(tmp_path, _rows(7))
    whole = TextCsvSource(str(path), ["cxr", "fundus"], chunk_rows=100).records()
    chunked = TextCsvSource(str(path), ["cxr", "fundus"], chunk_rows=2).records()
    assert whole == chunked and len(whole) == 7
    r = whole[3]
    assert r["modality"] == 1 and r["text"] == "chest X-ray: finding 3" and r["label"] == 0
    assert r["attrs"] == {"modal": "fundus", "sex": "M"} and r["where"].endswith("row 5")
    assert "error" not in r


def test_text_csv_bom_and_missing_columns(tmp_path):
    path = _write_manifest(tmp_path, _rows(2), encoding="utf-8-sig")
    assert len(TextCsvSource(str(path), ["cxr", "fundus"]).records()) == 2
    bad = _write_manifest(tmp_path, [{k: v for k, v in r.items() if k != "modal"} for r in _rows(2)], "b.csv")
    with pytest.raises(DataError, match=r"missing column\(s\) \['modal'\]"):
        TextCsvSource(str(bad), ["cxr"]).records()
    with pytest.raises(DataError, match="manifest not found"):
        TextCsvSource(str(tmp_path / "none.csv"), ["cxr"]).records()


@pytest.mark.parametrize("change, message", [
    ({"modal": "ultrasound"}, "unknown modality 'ultrasound'"),
    ({"text": ""}, "empty 'text' cell"),
    ({"path": "missing.png"}, "image file not found"),
    ({"label": "left"}, "not an integer class"),
])
def test_text_csv_bad_rows_named_or_skipped(tmp_path, change, message):
    rows = _rows(6)
    rows[2].update(change)
    path = _write_manifest(tmp_path, rows)
    recs = TextCsvSource(str(path), ["cxr", "fundus"]).records()
    assert message in recs[2]["error"] and "row 4" in recs[2]["error"]

    def dm(on_bad):
        src = TextCsvSource(str(path), ["cxr", "fundus"])
        return ImageDataModule(src, image_size=16, channels=3, require_mask=False, on_bad=on_bad, modalities=["cxr", "fundus"],
                               splits={"use_source": False, "fractions": {"train": 1.0, "val": 0.0, "test": 0.0}})
    with pytest.raises(DataError, match=f"row 4.*{message}"):
        dm("error").load_split("train")
    skipping = dm("skip")
    assert len(skipping.load_split("train")[2]) == 5 and skipping.summary()["skipped"] == 1


def test_batch_carries_text_and_modality(tmp_path):
    src = PhantomMultimodalSource(n_images=20, size=32, seed=0)
    dm = ImageDataModule(src, image_size=32, channels=3, require_mask=False, modalities=MODS, resize="pad",
                         normalize={"mean": [0.5] * 3, "std": [0.5] * 3},
                         text_augment={"p_synonym": 1.0, "p_shuffle": 0, "p_drop": 0},
                         splits={"use_source": False, "fractions": {"train": 0.6, "val": 0.2, "test": 0.2}})
    batch = next(iter(dm.dataloader("train", train=True)))
    assert isinstance(batch["text"], list) and batch["modality"].dtype == torch.int64
    recs = dm.load_split("train")[2]
    item = dm.dataset("train")[0]  # normalised to [-1, 1]: the stored uint8 pixels / 127.5 - 1
    expected = torch.from_numpy(dm.load_split("train")[0][0].numpy()).float() / 127.5 - 1
    assert torch.allclose(item["image"], expected, atol=1e-5)
    # training prompts are augmented, evaluation prompts are the records' own text
    ds_train, ds_val = dm.dataset("train", augment=True), dm.dataset("train")
    assert ds_val[0]["text"] == recs[0]["text"] != ds_train[0]["text"]
    with pytest.raises(ValueError, match="data.resize"):
        ImageDataModule(src, resize="crop")
