"""The datamodule serves the batch contract and is deterministic for a seed."""
from __future__ import annotations

import pytest
import torch

from medtrust.data.datamodule import ImageDataModule
from medtrust.data.phantoms.derm import PhantomDermSource
from medtrust.runs.resolvers import PROJECT_ROOT
from omegaconf import OmegaConf

AUG = OmegaConf.to_container(OmegaConf.load(PROJECT_ROOT / "conf/data/augment/standard.yaml"))


def make(seed=0, **kw):
    return ImageDataModule(PhantomDermSource(n_images=30, size=32, seed=1), image_size=[32, 32], augment=AUG,
                           normalize={"mean": [0.5] * 3, "std": [0.25] * 3}, batch_size=4, seed=seed, **kw)


def test_batch_contract():
    b = next(iter(make().train_dataloader()))
    assert b["image"].dtype == torch.float32 and b["image"].shape == (4, 3, 32, 32)
    assert b["mask"].shape == (4, 1, 32, 32)
    assert b["label"].dtype == torch.long
    assert isinstance(b["patient_id"], list) and isinstance(b["path"], list)
    assert set(b["attrs"]) == {"skin_tone", "sex", "age_group"} and len(b["attrs"]["sex"]) == 4


def test_same_seed_same_batches_different_seed_differs():
    def first(seed):
        torch.manual_seed(0)
        return next(iter(make(seed).train_dataloader()))["image"]

    assert torch.equal(first(0), first(0))
    assert not torch.equal(first(0), first(1))


def test_eval_loader_is_not_augmented_and_keeps_order():
    dm = make()
    a = next(iter(dm.val_dataloader()))
    b = next(iter(dm.val_dataloader()))
    assert torch.equal(a["image"], b["image"]) and a["index"].tolist() == list(range(len(a["index"])))


@pytest.mark.parametrize("kw,msg", [({"image_size": [4, 4]}, "data.image_size"), ({"on_bad": "ignore"}, "data.on_bad"),
                                    ({"batch_size": 0}, "data.batch_size")])
def test_bad_settings(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ImageDataModule(PhantomDermSource(n_images=4, size=16), **kw)


def test_balanced_sampling_evens_out_classes():
    from medtrust.data.phantoms.cxr import PhantomCxrSource

    def share(balanced):
        dm = ImageDataModule(PhantomCxrSource(n_images=120, size=16, prevalence={"pneumonia": 0.15}), image_size=16,
                             channels=1, require_mask=False, num_classes=2, batch_size=1000,
                             balanced_sampling=balanced, splits={"fractions": {"train": 1.0}})
        labels = torch.cat([b["label"] for _ in range(5) for b in dm.train_dataloader()])
        return labels.float().mean().item()

    assert share(False) < 0.3 and 0.4 < share(True) < 0.6


class Other:
    """A source that lists the records it is given (describes itself as ``other()``)."""

    def __init__(self, recs):
        self.recs = recs

    def records(self):
        return self.recs

    def describe(self):
        return "other()"


def test_train_source_replaces_the_training_split_only():
    """data.train_source: train on one source (e.g. rated generated samples), validate and test on another."""
    from medtrust.data.records import DataError

    real = PhantomDermSource(n_images=30, size=32, seed=1)
    donor = PhantomDermSource(n_images=6, size=32, seed=2).records()
    extra = [{**r, "id": f"gen_{i}", "patient_id": f"gen{i}", "reward": float(i)} for i, r in enumerate(donor)]
    dm = ImageDataModule(real, image_size=[32, 32], batch_size=6, train_source=Other(extra))
    plain = ImageDataModule(real, image_size=[32, 32], batch_size=6)
    assert [r["id"] for r in dm.split_records["train"]] == [f"gen_{i}" for i in range(6)]
    for split in ("val", "test"):
        assert [r["id"] for r in dm.split_records[split]] == [r["id"] for r in plain.split_records[split]]
    b = next(iter(dm.dataloader("train")))
    assert sorted(b["reward"].tolist()) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # the batch carries the reward
    assert "reward" not in next(iter(dm.dataloader("val")))
    assert dm.summary()["train_source"] == "other()" and "train from other()" in dm.summary()["split_method"]
    clash = [{**extra[0], "id": plain.split_records["val"][0]["id"]}]
    with pytest.raises(DataError, match="occur more than once"):
        ImageDataModule(real, image_size=[32, 32], train_source=Other(clash)).split_records
    with pytest.raises(DataError, match="yielded no records"):
        ImageDataModule(real, image_size=[32, 32], train_source=Other([])).split_records


def test_train_extra_adds_to_the_training_split_and_keeps_val_and_test():
    """data.train_extra (the audit's downstream test): synthetic records join the real training split under
    ``extra/`` ids, even when their own ids are the real ones', and val / test do not change."""
    from medtrust.data.records import DataError

    real = PhantomDermSource(n_images=30, size=32, seed=1)
    plain = ImageDataModule(real, image_size=[32, 32], batch_size=6)
    # the same ids as the real records (derm_0000 ...), and the prompt / modality / reward a generated folder carries
    donor = [{**r, "text": "a prompt", "modality": 0, "reward": 1.0} for r in PhantomDermSource(n_images=6, size=32, seed=2).records()]
    dm = ImageDataModule(real, image_size=[32, 32], batch_size=6, train_extra=Other(donor))
    real_train = [r["id"] for r in plain.split_records["train"]]
    assert [r["id"] for r in dm.split_records["train"]] == real_train + [f"extra/{r['id']}" for r in donor]
    assert all(r["patient_id"].startswith("extra/") for r in dm.split_records["train"][len(real_train):])
    for split in ("val", "test"):
        assert [r["id"] for r in dm.split_records[split]] == [r["id"] for r in plain.split_records[split]]
    assert dm.summary()["train_extra"] == "other()" and "plus 6 training records from other()" in dm.summary()["split_method"]
    assert len(dm.load_split("train")[0]) == len(real_train) + 6
    ds = dm.dataset("train")  # real and synthetic items carry the same keys (else a mixed batch does not collate)
    keys = {frozenset(ds[i]) for i in range(len(ds))}
    assert len(keys) == 1 and not {"text", "reward", "modality"} & set(next(iter(keys)))
    with pytest.raises(DataError, match="data.train_extra other\\(\\): the source yielded no records"):
        ImageDataModule(real, image_size=[32, 32], train_extra=Other([])).split_records


def test_same_patient_groups_keep_one_patients_images_in_one_split():
    """data.splits.same_patient: two ids of one patient (ieee8023 lists the same images under two) are split
    as one patient; unknown ids and ids in two groups are refused."""
    from medtrust.data.records import DataError

    src = PhantomDermSource(n_images=60, size=16, seed=3)
    plain = ImageDataModule(src, image_size=16)
    split_of = {r["patient_id"]: s for s, rs in plain.split_records.items() for r in rs}
    a = next(p for p, s in split_of.items() if s == "train")
    b = next(p for p, s in split_of.items() if s == "test")
    dm = ImageDataModule(src, image_size=16, splits={"same_patient": [[a, b]]})
    ids_of = {s: {r["id"] for r in rs} for s, rs in dm.split_records.items()}
    b_ids = {r["id"] for r in src.records() if r["patient_id"] == b}
    assert b_ids <= ids_of["train"] and not b_ids & ids_of["test"]  # b's images follow a's split
    assert {r["patient_id"] for r in dm.split_records["train"]} >= {a} and b not in {r["patient_id"] for rs in dm.split_records.values() for r in rs}
    with pytest.raises(DataError, match=r"same_patient: patient id\(s\) \['nobody'\] are not in"):
        ImageDataModule(src, image_size=16, splits={"same_patient": [[a, "nobody"]]}).split_records
    with pytest.raises(ValueError, match="is in two groups"):
        ImageDataModule(src, image_size=16, splits={"same_patient": [[a, b], [a, b]]})
    with pytest.raises(ValueError, match="is not a group"):
        ImageDataModule(src, image_size=16, splits={"same_patient": [[a]]})
