"""Write procedural phantom images to a folder of PNGs, e.g. as an out-of-distribution set for a
classifier trained on real chest X-rays:

    python experiments/phantom_images.py --out /tmp/phantom_cxr --n 200
    python evaluate.py run_dir=<kermany run> "ood.sets=[/tmp/phantom_cxr]"

The images are the phantom CXR source's (``medtrust.data.phantoms.cxr``), rendered at ``--size``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from medtrust.data.phantoms.cxr import PhantomCxrSource


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder to create (must not exist: nothing is overwritten)")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=False)
    for r in PhantomCxrSource(n_images=a.n, size=a.size, seed=a.seed).records():
        img = np.asarray(r["image"], dtype=np.uint8)
        Image.fromarray(img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img).save(out / f"{r['id']}.png")
    print(f"{a.n} phantom CXRs ({a.size} px, seed {a.seed}) written to {out}")


if __name__ == "__main__":
    main()
