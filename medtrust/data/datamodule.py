"""One LightningDataModule for every 2-D image source.

It asks its *source* for records, splits them (official or patient-level), loads each split once
into memory at the working resolution (uint8, validated: missing/corrupt files, masks of the wrong
size, repeated ids, the same pixels in two splits), and serves batches that follow the batch
contract of ``DESIGN.md``: ``image``, ``mask``, ``label``, ``patient_id``, ``attrs``, ``path``,
``index``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from monai.data import DataLoader
from torch.utils.data import Dataset

from medtrust.data.duplicates import (DUPLICATE_COLUMNS, DUPLICATE_POLICIES, PixelIndex, check_unique_ids,
                                      describe_groups, pixel_digest)
from medtrust.data.records import (ALL_SPLITS, RESIZE_MODES, DataError, RealPaths, Record, load_record,
                                   outside_root, peek_record)
from medtrust.data.splits import check_fractions, make_splits, write_splits
from medtrust.data.transforms import build_transforms, denormalize
from medtrust.utils.logging import get_logger

log = get_logger(__name__)


class CachedImageDataset(Dataset):
    """Samples held in memory as uint8; the transform runs per item.

    Args:
        images: uint8 tensors C×H×W.
        masks: uint8 tensors 1×H×W or ``None`` entries.
        records: the records (metadata) in the same order.
        transform: callable on ``{"image", "mask"}`` dicts (floats in [0, 1]).
        text_transform: callable ``(text, index) -> text`` applied to a record's ``text`` (prompt
            augmentation of the training split), or ``None``.
    """

    def __init__(self, images: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None],
                 records: Sequence[Record], transform: Any, text_transform: Any = None) -> None:
        self.images, self.masks, self.records, self.transform = images, masks, records, transform
        self.text_transform = text_transform
        self.attr_keys = sorted({k for r in records for k in r.get("attrs", {})})

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        d: dict[str, Any] = {"image": self.images[i].float().div_(255)}
        if self.masks[i] is not None:
            d["mask"] = self.masks[i].float()
        d = self.transform(d)
        r = self.records[i]
        d["index"] = i
        d["patient_id"] = str(r["patient_id"])
        d["path"] = str(r.get("path") or r["id"])
        if r.get("label") is not None:
            d["label"] = int(r["label"])
        if "text" in r:
            d["text"] = self.text_transform(r["text"], i) if self.text_transform else str(r["text"])
        if r.get("modality") is not None:
            d["modality"] = int(r["modality"])
        if r.get("reward") is not None:
            d["reward"] = float(r["reward"])
        if self.attr_keys:
            d["attrs"] = {k: str(r.get("attrs", {}).get(k, "unknown")) for k in self.attr_keys}
        return d


class StreamedSplit:
    """A split's images and masks read from their files each time they are used (``data.cache=false``): memory
    holds the records, never the pixels. :meth:`views` gives sequences that behave like the cached lists (one
    decode serves ``images[i]`` and ``masks[i]``)."""

    def __init__(self, records: Sequence[Record], load: Any) -> None:
        self.records, self._load, self._last = list(records), load, (-1, None)

    def pair(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._last[0] != i:
            res = self._load(self.records[i])
            if isinstance(res, DataError):  # its header was fine at setup: the pixels are not
                raise DataError(f"{res} (data.cache=false reads pixels when they are used; data.cache=true checks "
                                "every file at setup, where data.on_bad=skip can skip it)")
            self._last = (i, (torch.from_numpy(res[0]), torch.from_numpy(res[1]) if res[1] is not None else None))
        return self._last[1]

    def views(self, with_masks: bool) -> tuple[Sequence[torch.Tensor], Sequence[torch.Tensor | None]]:
        n = len(self.records)
        return _StreamView(self.pair, n, 0), (_StreamView(self.pair, n, 1) if with_masks else [None] * n)


class _StreamView(Sequence):
    """Item ``k`` of ``pair(i)`` for i < n. It holds the bound method, not the split: no reference cycle (MONAI's
    randomizer seeding walks a dataset's attributes recursively)."""

    def __init__(self, pair: Any, n: int, k: int) -> None:
        self._pair, self._n, self._k = pair, n, k

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i) + (len(self) if int(i) < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._pair(i)[self._k]


class ImageDataModule(L.LightningDataModule):
    """Datamodule over any record source.

    Args:
        source: object with ``records()`` and ``describe()`` (a phantom, CSV, ISIC or folder source).
        image_size: working (H, W), or one int for square images.
        channels: 1 (grayscale) or 3 (RGB).
        require_mask: every sample must have a mask (segmentation).
        require_label: every sample must have a label (classification training/evaluation).
        num_classes: labels must lie in ``[0, num_classes)`` when given.
        splits: ``{"use_source": bool, "fractions": {...}, "seed": int, "calibration_fraction": float}``;
            ``calibration_fraction`` > 0 moves that share of the training patients into a ``cal``
            split, on which temperature scaling is fitted instead of on ``val``. ``same_patient``: groups of
            patient ids that are one patient (e.g. ieee8023 lists the same images under two ids): each group
            takes its first id before splits are computed, so its images stay in one split.
        augment: ``{name: {"enabled", "prob", bounds...}}`` for the training split.
        normalize: ``{"mean": [...], "std": [...]}`` or ``None``.
        batch_size: training batch size.
        eval_batch_size: batch size for val/test/predict.
        num_workers: DataLoader workers (0 = main process).
        balanced_sampling: draw training samples with weights 1 / class frequency (labels needed).
        on_bad: ``"error"`` stops at the first bad sample; ``"skip"`` drops it and reports the count.
        duplicates: the same pixels (at the working resolution) in two splits, e.g. one image under two
            patient ids: ``"error"`` refuses the split naming both records; ``"report"`` warns, counts
            them in :meth:`summary` and lists them in ``splits/duplicates.csv``. Copies inside one
            split are only counted. Checked over the splits loaded so far (``cal`` included).
        load_threads: threads used to read and resize files once at setup.
        resize: ``stretch`` to ``image_size``, or ``pad`` (keep the aspect ratio, pad with black).
        text_augment: prompt augmentation of the training split's ``text``
            (:class:`medtrust.data.prompts.PromptAugmenter` settings), or ``None``.
        modalities: modality names of a multimodal source (records' ``modality`` indexes it).
        seed: random state of the augmentation pipeline.
        manifest, root, path: where the data lives (shared with the source by interpolation; recorded
            in the run's data summary).
        name: short data-set name for reports.
        class_names: the names of classes 0, 1, ... (optional; the audit checks a classifier detects a finding by them).
        train_source: another source whose records are the training split, all of them (e.g. a
            generator's rated samples, or synthetic images for a classifier), while ``source`` keeps
            giving val / test / cal (its own training records are left out). None: ``source`` alone.
        train_extra: another source whose records are ADDED to the training split (e.g. synthetic images
            with a label column, to measure whether they help a classifier on real test images); their ids
            and patient ids are prefixed ``extra/`` so they never meet a real patient. None: nothing added.
        cache: read and check every image once at setup and keep the pixels in memory (fast epochs, every
            file fully checked). False: stream them from their files when used, keeping only the records (data
            sets larger than memory); setup checks each file's header, the pixels are checked when read, and
            the duplicate-pixel check across splits is not made.
        allow_outside_root: read image / mask files outside their source's data root (a manifest's folder, a
            source's ``root``). False: such a record (a ``../`` or absolute path, a symlink out) is a bad sample,
            refused naming its row, or skipped and counted under ``on_bad=skip``.
    """

    def __init__(
        self,
        source: Any,
        image_size: int | Sequence[int] = 64,
        channels: int = 3,
        require_mask: bool = True,
        require_label: bool = False,
        num_classes: int | None = None,
        splits: Mapping[str, Any] | None = None,
        augment: Mapping[str, Any] | None = None,
        normalize: Mapping[str, Sequence[float]] | None = None,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        on_bad: str = "error",
        duplicates: str = "error",
        load_threads: int = 2,
        resize: str = "stretch",
        text_augment: Mapping[str, Any] | None = None,
        modalities: Sequence[str] | None = None,
        seed: int = 0,
        drop_last: bool = False,
        balanced_sampling: bool = False,
        manifest: str | None = None,
        root: str | None = None,
        path: str | None = None,
        name: str = "data",
        class_names: Sequence[str] | None = None,
        train_source: Any = None,
        train_extra: Any = None,
        allow_outside_root: bool = False,
        cache: bool = True,
    ) -> None:
        super().__init__()
        self.allow_outside_root = bool(allow_outside_root)
        self.cache = bool(cache)
        self.train_source = train_source
        self.train_extra = train_extra
        size = [int(image_size)] * 2 if isinstance(image_size, int) else [int(s) for s in image_size]
        if len(size) != 2 or min(size) < 8:
            raise ValueError(f"data.image_size must be an int or [H, W] with sides >= 8, got {image_size}")
        if on_bad not in ("error", "skip"):
            raise ValueError(f"data.on_bad must be 'error' or 'skip', got {on_bad!r}")
        if duplicates not in DUPLICATE_POLICIES:
            raise ValueError(f"data.duplicates must be one of {DUPLICATE_POLICIES}, got {duplicates!r}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if resize not in RESIZE_MODES:
            raise ValueError(f"data.resize must be one of {RESIZE_MODES}, got {resize!r}")
        self.resize = resize
        self.modalities = [str(m) for m in modalities] if modalities else None
        from medtrust.data.prompts import PromptAugmenter

        self.text_augment = PromptAugmenter(**dict(text_augment), seed=int(seed)) if text_augment else None
        self.source = source
        self.image_size = size
        self.channels = int(channels)
        self.require_mask = bool(require_mask)
        self.require_label = bool(require_label)
        self.num_classes = int(num_classes) if num_classes else None
        self.class_names = [str(c) for c in class_names] if class_names else None
        if self.class_names and self.num_classes and len(self.class_names) != self.num_classes:
            raise ValueError(f"data.class_names {self.class_names} names {len(self.class_names)} classes; "
                             f"data.num_classes is {self.num_classes}")
        sp = dict(splits or {})
        self.split_cfg = {"use_source": bool(sp.get("use_source", True)),
                          "fractions": check_fractions(sp.get("fractions", {"train": 0.7, "val": 0.15, "test": 0.15})),
                          "seed": int(sp.get("seed", 0)),
                          "calibration_fraction": float(sp.get("calibration_fraction", 0.0))}
        self.same_patient: dict[str, str] = {}
        for group in sp.get("same_patient") or []:
            ids = [str(x) for x in group]
            if len(ids) < 2:
                raise ValueError(f"data.splits.same_patient: {ids} is not a group; expected lists of two or more patient ids")
            for x in ids[1:]:
                if x in self.same_patient:
                    raise ValueError(f"data.splits.same_patient: patient {x!r} is in two groups")
                self.same_patient[x] = ids[0]
        if self.same_patient:
            self.split_cfg["same_patient"] = [[str(x) for x in g] for g in sp["same_patient"]]
        self.augment = {k: dict(v) for k, v in (augment or {}).items()}
        self.normalize = ({"mean": list(normalize["mean"]), "std": list(normalize["std"])} if normalize else None)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.on_bad = on_bad
        self.duplicates = duplicates
        self.load_threads = max(1, int(load_threads))
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.balanced_sampling = bool(balanced_sampling)
        self.location = manifest or root or path
        self.name = name
        # Build once to fail fast on bad augmentation/normalisation keys.
        # masks (when a split has them) always move with the image, also for classification
        self._train_tf = build_transforms(self.augment, self.channels, self.normalize, train=True,
                                          with_mask=True, seed=self.seed)
        self._eval_tf = build_transforms(None, self.channels, self.normalize, train=False, with_mask=True)
        self._split_records: dict[str, list[Record]] | None = None
        self._split_how = ""
        self._cache: dict[str, tuple[list[torch.Tensor], list[torch.Tensor | None], list[Record]]] = {}
        self.skipped: list[dict[str, str]] = []
        self._pixels = PixelIndex()

    # -- records and splits -------------------------------------------------------------
    @property
    def split_records(self) -> dict[str, list[Record]]:
        if self._split_records is None:
            records = self._inside_root(self.source)
            if not records:
                raise DataError(f"{self.source.describe()}: the source yielded no records")
            check_unique_ids(records, self.source.describe())  # one place for every source
            if self.same_patient:
                unknown = sorted(set(self.same_patient) - {str(r["patient_id"]) for r in records})
                if unknown:
                    raise DataError(f"data.splits.same_patient: patient id(s) {unknown} are not in {self.source.describe()}")
                records = [{**r, "patient_id": self.same_patient.get(str(r["patient_id"]), r["patient_id"])} for r in records]
            self._split_records, self._split_how = make_splits(
                records, self.split_cfg["fractions"], self.split_cfg["seed"], self.split_cfg["use_source"],
                self.split_cfg["calibration_fraction"])
            if self.train_source is not None:
                train = [{**r, "split": "train"} for r in self._inside_root(self.train_source)]
                if not train:
                    raise DataError(f"data.train_source {self.train_source.describe()}: the source yielded no records")
                held = [r for s, rs in self._split_records.items() if s != "train" for r in rs]
                check_unique_ids([*train, *held], f"{self.train_source.describe()} + {self.source.describe()}")
                self._split_records["train"] = train
                self._split_how += f"; train from {self.train_source.describe()}"
            if self.train_extra is not None:
                # the batch carries what the main source's records carry: a generated folder's prompt, modality or
                # reward would not collate beside real records without them (and a classifier does not use them)
                real = next((r for rs in self._split_records.values() for r in rs), {})
                drop = {k for k in ("text", "modality", "reward", "quality") if k not in real}
                extra = [{**{k: v for k, v in r.items() if k not in drop}, "id": f"extra/{r['id']}",
                          "patient_id": f"extra/{r['patient_id']}", "split": "train"} for r in self._inside_root(self.train_extra)]
                if not extra:
                    raise DataError(f"data.train_extra {self.train_extra.describe()}: the source yielded no records")
                self._split_records["train"] = [*self._split_records.get("train", []), *extra]
                self._split_how += f"; plus {len(extra)} training records from {self.train_extra.describe()}"
        return self._split_records

    def _inside_root(self, source: Any) -> list[Record]:
        """``source``'s records; one whose files lie outside the source's ``data_root`` carries the reason as its
        ``error`` (a bad sample) unless ``allow_outside_root``. Sources of in-memory images have no root."""
        records = source.records()
        root = getattr(source, "data_root", None)
        if root is None or self.allow_outside_root:
            return records
        out, paths = [], RealPaths()
        for rec in records:
            why = None if rec.get("error") else outside_root(rec, root, paths)
            out.append({**rec, "error": why} if why else rec)
        return out

    def write_splits(self, out_dir: str | Path) -> str:
        """Write the split assignment (CSV + JSON with its sha256) into ``out_dir``, plus
        ``skipped.csv`` (bad samples skipped) and ``duplicates.csv`` (images found in two loaded
        splits, under ``duplicates=report``) when there are any."""
        split_records = self.split_records  # computes the split (and its method) if not done yet
        info = {"source": self.source.describe(), "method": self._split_how, **self.split_cfg}
        digest = write_splits(split_records, out_dir, info)
        import pandas as pd

        self.write_skipped(out_dir)
        if rows := self._pixels.rows():
            from medtrust.utils.io import write_csv

            write_csv(Path(out_dir) / "duplicates.csv", pd.DataFrame(rows, columns=DUPLICATE_COLUMNS))
        return digest

    def write_skipped(self, out_dir: str | Path) -> Path | None:
        """Write ``out_dir/skipped.csv`` (split, id, reason of every sample skipped under ``on_bad=skip``),
        or nothing when none was skipped. Every entry point that reads data calls it on its ``splits/``."""
        if not self.skipped:
            return None
        import pandas as pd

        from medtrust.utils.io import write_csv

        return write_csv(Path(out_dir) / "skipped.csv", pd.DataFrame(self.skipped, columns=["split", "id", "reason"]))

    # -- loading ------------------------------------------------------------------------
    def _check_label(self, rec: Record) -> None:
        where = rec.get("where") or rec.get("path") or rec["id"]
        if self.modalities is not None and rec.get("modality") is not None \
                and not 0 <= int(rec["modality"]) < len(self.modalities):
            raise DataError(f"{where}: modality index {rec['modality']} is outside data.modalities {self.modalities}")
        label = rec.get("label")
        if label is None:
            if self.require_label:
                raise DataError(f"{where}: no label, but the task needs one (check the label column)")
            return
        if self.num_classes is not None and not 0 <= int(label) < self.num_classes:
            raise DataError(f"{where}: label {label} is outside [0, {self.num_classes}) "
                            f"(data.num_classes={self.num_classes})")

    def _load_one(self, rec: Record) -> tuple[np.ndarray, np.ndarray | None] | DataError:
        try:
            self._check_label(rec)
            return load_record(rec, self.image_size, self.channels, self.require_mask, self.resize)
        except DataError as err:
            where = rec.get("where")
            msg = str(err) if not where or str(err).startswith(where) else f"{where}: {err}"
            return DataError(msg)

    def _peek_one(self, rec: Record) -> tuple[None, None] | DataError:
        try:
            self._check_label(rec)
            peek_record(rec)
            return None, None
        except DataError as err:
            where = rec.get("where")
            return DataError(str(err) if not where or str(err).startswith(where) else f"{where}: {err}")

    def load_split(self, split: str) -> tuple[Sequence[torch.Tensor], Sequence[torch.Tensor | None], list[Record]]:
        """Read, validate and cache one split; raise or skip bad samples per ``on_bad`` (``cache=false``: check
        the files' headers, and return views that read the pixels when indexed).

        Raises:
            DataError: a bad sample (under ``on_bad=error``) or an empty split.
        """
        if split not in ALL_SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {ALL_SPLITS}")
        if split in self._cache:
            return self._cache[split]
        recs = self.split_records[split]
        if not recs:
            counts = {s: len(r) for s, r in self.split_records.items()}
            raise DataError(f"{self.source.describe()}: split {split!r} is empty (split sizes {counts}); "
                            "the data or data.splits.fractions must give it at least one image "
                            "(evaluate.py/explain.py: split=all uses every row)")
        with ThreadPoolExecutor(self.load_threads) as pool:
            results = list(pool.map(self._load_one if self.cache else self._peek_one, recs))
        images, masks, kept = [], [], []
        for rec, res in zip(recs, results):
            if isinstance(res, DataError):
                if self.on_bad == "error":
                    raise DataError(f"{res} (set data.on_bad=skip to skip bad samples and report them)")
                self.skipped.append({"split": split, "id": rec["id"], "reason": str(res)})
                continue
            if self.cache:
                images.append(torch.from_numpy(res[0]))
                masks.append(torch.from_numpy(res[1]) if res[1] is not None else None)
            kept.append(rec)
        n_bad = len(recs) - len(kept)
        if n_bad:
            log.warning(f"data.on_bad=skip: skipped {n_bad} bad sample(s) in split {split!r} "
                        "(listed in splits/skipped.csv of the output folder)")
        if not kept:
            raise DataError(f"split {split!r}: all {len(recs)} samples were bad and skipped")
        if not self.cache:
            with_masks = all(r.get("mask_path") or r.get("mask") is not None for r in kept)
            self._cache[split] = (*StreamedSplit(kept, self._load_one).views(with_masks), kept)
            return self._cache[split]
        self._check_duplicates(split, images, kept)
        if any(m is None for m in masks):
            masks = [None] * len(masks)  # a batch carries masks only when every sample has one
        self._cache[split] = (images, masks, kept)
        return self._cache[split]

    def _check_duplicates(self, split: str, images: Sequence[torch.Tensor], recs: Sequence[Record]) -> None:
        """Compare ``split``'s pixels with every split loaded before; raise or report per ``duplicates``."""
        digests = [pixel_digest(t.numpy()) for t in images]
        groups = self._pixels.across(split, digests, recs)
        if groups:
            text = (f"split {split!r}: {len(groups)} image(s) have the same pixels as images of split(s) "
                    f"{sorted(self._pixels.splits)} (leakage across splits, e.g. one image under two patient "
                    f"ids): {describe_groups(groups)}")
            if self.duplicates == "error":
                raise DataError(f"{text}; expected each image in one split only: remove the copies, or give them "
                                "one patient id (computed splits) or one split value (official splits); "
                                "data.duplicates=report keeps them and lists them in splits/duplicates.csv")
            log.warning(f"{text} (data.duplicates=report; listed in splits/duplicates.csv)")
        self._pixels.add(split, digests, recs)

    @property
    def train_images_fixed(self) -> bool:
        """True when the training split's pixels are the same every epoch (no augmentation enabled): what
        is computed from them once, e.g. the generator's latents, stays valid."""
        return not any(bool(b.get("enabled", False)) for b in self.augment.values())

    def has_split(self, split: str) -> bool:
        return bool(self.split_records.get(split))

    def dataset(self, split: str, augment: bool = False) -> CachedImageDataset:
        images, masks, recs = self.load_split(split)
        return CachedImageDataset(images, masks, recs, self._train_tf if augment else self._eval_tf,
                                  self.text_augment if augment else None)

    def setup(self, stage: str | None = None) -> None:
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage or "", ())
        if stage == "fit" and self.has_split("cal"):
            needed = (*needed, "cal")  # fitting ends with temperature scaling on it: fail fast, check leakage
        for split in needed:
            self.load_split(split)

    # -- loaders ------------------------------------------------------------------------
    def dataloader(self, split: str, train: bool = False) -> DataLoader:
        """Loader for ``split``; ``train`` enables shuffling and augmentation."""
        ds = self.dataset(split, augment=train)
        gen = torch.Generator().manual_seed(self.seed)
        sampler = None
        if train and self.balanced_sampling:
            labels = [r.get("label") for r in ds.records]
            if any(lab is None for lab in labels):
                raise DataError("data.balanced_sampling=true needs a label on every training image")
            counts = np.bincount(labels)
            weights = torch.tensor([1.0 / counts[lab] for lab in labels], dtype=torch.double)
            sampler = torch.utils.data.WeightedRandomSampler(weights, len(labels), replacement=True, generator=gen)
        return DataLoader(
            ds, batch_size=self.batch_size if train else self.eval_batch_size, shuffle=train and sampler is None,
            sampler=sampler,
            drop_last=train and self.drop_last and len(ds) > self.batch_size, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0, generator=gen,
        )

    def train_dataloader(self) -> DataLoader:
        return self.dataloader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self.dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.dataloader("test")

    def augmented_dataset(self, split: str, augment: Mapping[str, Any], seed: int = 0) -> CachedImageDataset:
        """``split`` through the given augmentation blocks (``data.augment`` layout: each with ``enabled``,
        ``prob`` and bounds; geometric ones move the mask too), seeded, then normalised: a test-time
        preprocessing condition."""
        images, masks, recs = self.load_split(split)
        tf = build_transforms(augment, self.channels, self.normalize, train=True, with_mask=True, seed=seed)
        return CachedImageDataset(images, masks, recs, tf)

    def mapped_dataset(self, split: str, fn: Any) -> CachedImageDataset:
        """``split`` with every cached image passed through ``fn(index, uint8 H×W×C) -> uint8 H×W×C``
        (e.g. a corruption), then this data's evaluation preprocessing; labels, masks and records kept."""
        images, masks, recs = self.load_split(split)
        out = [torch.from_numpy(np.ascontiguousarray(fn(i, im.permute(1, 2, 0).numpy()))).permute(2, 0, 1).contiguous()
               for i, im in enumerate(images)]
        return CachedImageDataset(out, masks, recs, self._eval_tf)

    def external_dataset(self, files: Sequence[str | Path], where: str) -> tuple[CachedImageDataset, list[dict[str, Any]]]:
        """Image files from elsewhere (e.g. an out-of-distribution set) at this data's evaluation
        preprocessing: read as this data's channels (PIL converts RGB <-> grayscale), resized like
        it (``resize``), normalised like it; no labels, masks or augmentation.

        Returns:
            the dataset and the files skipped under ``on_bad=skip`` (``{"path", "reason"}``).

        Raises:
            DataError: a file that cannot be read (naming it, under ``on_bad=error``) or no readable file.
        """
        recs = [{"id": str(f), "patient_id": str(f), "path": str(f)} for f in files]

        def load(rec: Record) -> tuple[np.ndarray, np.ndarray | None] | DataError:
            try:
                return load_record(rec, self.image_size, self.channels, False, self.resize)
            except DataError as err:
                return err

        with ThreadPoolExecutor(self.load_threads) as pool:
            results = list(pool.map(load, recs))
        images, kept, skipped = [], [], []
        for rec, res in zip(recs, results):
            if isinstance(res, DataError):
                if self.on_bad == "error":
                    raise DataError(f"{where}: {res} (set data.on_bad=skip to skip unreadable images and count them)")
                skipped.append({"path": rec["path"], "reason": str(res)})
                continue
            images.append(torch.from_numpy(res[0]))
            kept.append(rec)
        if not kept:
            raise DataError(f"{where}: none of its {len(recs)} image(s) could be read")
        return CachedImageDataset(images, [None] * len(images), kept, self._eval_tf), skipped

    # -- helpers for reports --------------------------------------------------------------
    def raw_image(self, split: str, index: int) -> np.ndarray:
        """Un-normalised image ``index`` of ``split`` as float H×W×C in [0, 1] (for figures)."""
        img = self.load_split(split)[0][index].float() / 255
        return img.permute(1, 2, 0).numpy()

    def to_display(self, image: torch.Tensor) -> torch.Tensor:
        """Undo normalisation of a batch image tensor (for figures)."""
        return denormalize(image, self.normalize)

    def summary(self) -> dict[str, Any]:
        """Name, source, sizes and data checks; the duplicate counts cover the splits loaded so far:
        ``duplicates_across_splits`` distinct images in two or more splits,
        ``duplicates_within_splits`` extra copies inside one split."""
        counts = {s: len(r) for s, r in self.split_records.items()}
        return {"name": self.name, "source": self.source.describe(), "location": self.location,
                **({"train_source": self.train_source.describe()} if self.train_source is not None else {}),
                **({"train_extra": self.train_extra.describe()} if self.train_extra is not None else {}),
                "image_size": self.image_size, "channels": self.channels, "split_method": self._split_how,
                "resize": self.resize, **({"modalities": self.modalities} if self.modalities else {}),
                "split_counts": counts, "skipped": len(self.skipped),
                "duplicates_across_splits": self._pixels.count_across(),
                "duplicates_within_splits": self._pixels.count_within(),
                **(self.source.summary() if callable(getattr(self.source, "summary", None)) else {})}
