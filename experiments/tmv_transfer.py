"""Transfer learning without downloads (Trustworthy Medical Vision): pretrain resnet18 on
PneumoniaMNIST, fine-tune on the Kermany CXRs, and compare with training from scratch.

    python experiments/tmv_transfer.py                         # all three runs (~12 min on 2 cores)
    python experiments/tmv_transfer.py --pretrained <run dir>  # reuse a PneumoniaMNIST run

Writes runs/transfer/<time>/transfer.csv and transfer.md (val AUROC, accuracy, ECE, Brier before
and after temperature scaling for scratch vs fine-tuned).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def train(out: Path, *overrides: str) -> Path:
    subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={out}"], check=True)
    return out


def row(name: str, run: Path) -> dict:
    m = json.loads((run / "metrics" / "val.json").read_text())
    u, c = m["cls_uncalibrated"], m["cls"]
    return {"model": name, "run": str(run), "val_auroc": c["auroc"], "val_accuracy": c["accuracy"],
            "val_ece_before_ts": u["ece_top_label"], "val_ece_after_ts": c["ece_top_label"], "val_brier_before_ts": u["brier"],
            "val_brier_after_ts": c["brier"], "temperature": m["temperature"], "fit_seconds": m["fit_seconds"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", help="existing PneumoniaMNIST run folder (skips pretraining)")
    p.add_argument("--scratch", help="existing from-scratch Kermany run folder")
    p.add_argument("--finetune-lr", default="0.0003")
    p.add_argument("--out", default=str(ROOT / "runs" / "transfer" / time.strftime("%Y-%m-%d_%H-%M-%S")))
    args = p.parse_args()
    out = Path(args.out)
    pre = Path(args.pretrained) if args.pretrained else train(out / "pneumoniamnist", "experiment=tmv_pneumoniamnist")
    scratch = Path(args.scratch) if args.scratch else train(out / "kermany_scratch", "experiment=tmv_kermany")
    ft = train(out / "kermany_finetuned", "experiment=tmv_kermany",
               f"model.init_from={pre / 'checkpoints' / 'best.ckpt'}", f"model.optimizer.lr={args.finetune_lr}")
    df = pd.DataFrame([row("from scratch", scratch), row("fine-tuned from PneumoniaMNIST", ft)])
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "transfer.csv", index=False)
    (out / "transfer.md").write_text(df.drop(columns="run").to_markdown(index=False, floatfmt=".4f") + "\n")
    print(df.drop(columns="run").to_markdown(index=False, floatfmt=".4f"))


if __name__ == "__main__":
    main()
