"""Scale figures of README -> Memory: a data set larger than memory streams, and a huge manifest is indexed.

    python experiments/scale.py stream --n 100000 --out /tmp/stream   # write n phantom PNGs, stream one epoch
    python experiments/scale.py index --rows 1000000 --out /tmp/index # a 1,000,000-row CSV manifest: index it

stream: n procedural phantoms (a bright disc of known radius and position on a noisy background, 96 x 96
    grayscale PNG, label = the disc's quadrant) are written with a CSV manifest, then read with
    ``data.cache=false``: setup checks every file's header, and one epoch of the training split is decoded
    through the DataLoader. Cached, the pixels alone would take n x 96 x 96 bytes.
index: a manifest of ``rows`` rows (path, label, patient_id, split, sex) whose paths are hard links to a few
    PNGs, 1,000 per folder (every row's file exists: the indexer stats each one), then
    ``CsvSource.records()`` and the split assignment, as train.py does before reading any pixel.

Each prints one JSON line with its seconds and the process's peak RSS (``ru_maxrss``). ``--out`` must be new.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZE = 96


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


YY, XX = np.mgrid[:SIZE, :SIZE]


def phantom(i: int) -> tuple[np.ndarray, int]:
    """Phantom ``i``: a disc (radius 8-20 px) on noise; label = the quadrant of its centre."""
    rng = np.random.default_rng(i)
    cy, cx, r = rng.integers(20, SIZE - 20), rng.integers(20, SIZE - 20), rng.integers(8, 21)
    yy, xx = YY, XX
    img = rng.normal(60, 12, (SIZE, SIZE)) + 140 * ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r)
    return np.clip(img, 0, 255).astype(np.uint8), int(cy >= SIZE // 2) * 2 + int(cx >= SIZE // 2)


def stream(n: int, out: Path, batch: int = 256) -> dict:
    import pandas as pd
    from PIL import Image

    t = time.perf_counter()
    rows = []
    for i in range(n):
        img, label = phantom(i)
        rel = f"img/{i // 1000:03d}/p{i}.png"
        if i % 1000 == 0:
            (out / rel).parent.mkdir(parents=True)
        Image.fromarray(img).save(out / rel, compress_level=1)
        rows.append({"path": rel, "label": label, "patient_id": f"p{i}"})
    pd.DataFrame(rows).to_csv(out / "manifest.csv", index=False)
    del rows
    written = time.perf_counter() - t

    from medtrust.data.datamodule import ImageDataModule
    from medtrust.data.sources.csv import CsvSource

    imported = peak_gib()
    t = time.perf_counter()
    dm = ImageDataModule(CsvSource(str(out / "manifest.csv"), mask_column=None, split_column=None),
                         image_size=SIZE, channels=1, require_mask=False, normalize=None, cache=False,
                         batch_size=batch, load_threads=2, num_classes=4,
                         splits={"fractions": {"train": 0.9, "val": 0.05, "test": 0.05}})
    dm.setup("fit")
    setup = time.perf_counter() - t
    t, seen, total = time.perf_counter(), 0, 0.0
    for b in dm.dataloader("train", train=False):
        seen += len(b["image"])
        total += float(b["image"].sum())
    epoch = time.perf_counter() - t
    return {"case": "stream", "images": n, "train_images_read": seen, "write_s": round(written, 1),
            "setup_s": round(setup, 1), "epoch_s": round(epoch, 1), "images_per_s": round(seen / epoch),
            "cached_pixels_gib": round(seen * SIZE * SIZE / 2**30, 2), "rss_after_imports_gib": round(imported, 2),
            "peak_rss_gib": round(peak_gib(), 2),
            "mean_pixel": round(total / max(seen, 1) / SIZE / SIZE, 4)}


def index(rows: int, out: Path) -> dict:
    from PIL import Image

    t = time.perf_counter()
    with open(out / "manifest.csv", "w") as fh:
        fh.write("path,label,patient_id,split,sex\n")
        for i in range(rows):
            rel = f"img/{i // 1000:04d}/x{i}.png"
            if i % 1000 == 0:
                (out / rel).parent.mkdir(parents=True)
            if i % 50_000 == 0:  # a file takes at most 65,000 hard links (ext4)
                src = out / f"phantom{i // 50_000}.png"
                Image.fromarray(phantom(i)[0]).save(src)
            os.link(src, out / rel)
            fh.write(f"{rel},{i % 2},p{i // 3},{('train', 'train', 'train', 'val', 'test')[(i // 3) % 5]},"
                     f"{'FM'[i % 2]}\n")
    written = time.perf_counter() - t
    base = peak_gib()

    from medtrust.data.sources.csv import CsvSource
    from medtrust.data.splits import make_splits

    t = time.perf_counter()
    records = CsvSource(str(out / "manifest.csv"), mask_column=None, attr_columns=["sex"]).records()
    read = time.perf_counter() - t
    splits, how = make_splits(records, {"train": 0.7, "val": 0.15, "test": 0.15}, 0)
    total = time.perf_counter() - t
    return {"case": "index", "rows": len(records), "write_s": round(written, 1), "records_s": round(read, 1),
            "records_and_splits_s": round(total, 1), "split_counts": {k: len(v) for k, v in splits.items()},
            "rss_before_index_gib": round(base, 2), "peak_rss_gib": round(peak_gib(), 2),
            "bytes_per_row": round((peak_gib() - base) * 2**30 / max(len(records), 1))}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("case", choices=("stream", "index"))
    p.add_argument("--n", type=int, default=100_000, help="stream: images")
    p.add_argument("--rows", type=int, default=1_000_000, help="index: manifest rows")
    p.add_argument("--out", required=True, help="a new folder (the files are written there)")
    a = p.parse_args(argv)
    out = Path(a.out)
    if out.exists():
        p.error(f"--out {out} exists; give a new folder")
    out.mkdir(parents=True)
    result = stream(a.n, out) if a.case == "stream" else index(a.rows, out)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
