"""LoRA adaptation of the phantom generator to real data (MINIM, issue 13), against a full fine-tune and
training from scratch on the same budget.

    python experiments/minim_manifest.py --out runs/minim_manifest
    python train.py experiment=minim_real_vae                          # the real autoencoder
    python experiments/minim_lora_real.py --base-run <experiment=minim run> --vae-run <minim_real_vae run>

Runs, in ``--out`` (each an ordinary run folder; the commands are printed and written to commands.txt):

- ``before``:   ``train.py experiment=minim_real_lora base_run=<base> model.vae_run=null train=false`` --
  the base as it is, its own (phantom) VAE included (cxr keeps its modality embedding, dermoscopy starts
  from the mean of the base's), evaluated on real val;
- ``before_real_vae``: the same with the real VAE swapped in and nothing trained (what the three trained
  runs start from);
- ``lora``:     ``experiment=minim_real_lora`` -- adapters (+ the small condition encoder) trained;
- ``finetune``: ``experiment=minim_real_finetune`` -- every UNet weight trained;
- ``scratch``:  ``experiment=minim_real_scratch`` -- a new UNet.

The three trained runs use the real VAE (the phantom VAE reconstructs real images at about 13 dB PSNR)
and all use the same judge (the ``before`` run's, fitted on the real train images), so their FID / KID
live in one feature space. Writes ``comparison.json`` and ``comparison.md``: FID,
KID, modality and finding accuracy, memorised share per modality and overall on val, the trainable share
of the UNet, seconds per optimiser step and the LoRA folder's size.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]


def train(out: Path, log: list[str], *overrides: str) -> Path:
    if (out / "status.json").is_file() and json.loads((out / "status.json").read_text()).get("status") == "completed":
        print(f"reusing {out}")
        return out
    cmd = ["python", "train.py", *overrides, f"hydra.run.dir={out}"]
    log.append(" ".join(cmd))
    print(" ".join(cmd), flush=True)
    subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={out}"], check=True, cwd=ROOT)
    return out


def steps_of(run: Path) -> int | None:
    csvs = sorted(run.glob("csv/**/metrics.csv"))
    if not csvs:
        return None
    df = pd.read_csv(csvs[0])
    return int(df["step"].max()) + 1 if "step" in df and df["step"].notna().any() else None


def rows(name: str, run: Path) -> list[dict]:
    m = json.loads((run / "metrics" / "val.json").read_text())
    gen = m["generation"]
    init = json.loads((run / "init_from.json").read_text()) if (run / "init_from.json").is_file() else {}
    lora = json.loads((run / "lora" / "lora.json").read_text()) if (run / "lora" / "lora.json").is_file() else {}
    fit, steps = m.get("fit_seconds"), steps_of(run)
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    trained = bool(cfg.get("train", True))
    trainable = (lora.get("trainable_share_of_unet") if cfg.model.lora.enabled else 1.0) if trained else 0.0
    out = []
    for group, v in [("overall", gen["overall"]), *gen["modalities"].items()]:
        out.append({"model": name, "group": group, "n": v.get("n_images"), "fid": v.get("fid"), "kid": v.get("kid"),
                    "modality_acc": v.get("modality_accuracy"), "modality_ci": v.get("modality_accuracy_ci"),
                    "finding_acc": v.get("finding_accuracy"), "memorised": v.get("memorised_share"),
                    "trainable_share_unet": trainable, "fit_s": fit, "steps": steps,
                    "s_per_step": (fit / steps) if fit and steps and trained else None,
                    "lora_mb": (lora["bytes"] / 2**20) if lora.get("bytes") and cfg.model.lora.enabled else None,
                    "new_modalities": ",".join((init.get("modalities") or {}).get("new", [])), "run": str(run)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-run", required=True, help="the phantom generator run (experiment=minim)")
    p.add_argument("--vae-run", required=True, help="the real autoencoder run (experiment=minim_real_vae)")
    p.add_argument("--epochs", type=int, default=30, help="the budget of every trained run")
    p.add_argument("--extra", nargs="*", default=[], help="overrides of every run (e.g. data.manifest=...)")
    p.add_argument("--out", default=str(ROOT / "runs" / "minim_lora_real" / time.strftime("%Y-%m-%d_%H-%M-%S")))
    a = p.parse_args()
    base, vae = Path(a.base_run).resolve(), Path(a.vae_run).resolve()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log: list[str] = []
    common = [f"trainer.max_epochs={a.epochs}", *a.extra]
    before = train(out / "before", log, "experiment=minim_real_lora", f"base_run={base}", "model.vae_run=null",
                   "train=false", *common)
    judge = [f"evaluation.evaluator.from_run={before}"]
    real = [f"model.vae_run={vae}"]
    runs = {"before": before,
            "before_real_vae": train(out / "before_real_vae", log, "experiment=minim_real_lora", f"base_run={base}",
                                     *real, "train=false", *common, *judge),
            "lora": train(out / "lora", log, "experiment=minim_real_lora", f"base_run={base}", *real, *common, *judge),
            "finetune": train(out / "finetune", log, "experiment=minim_real_finetune", f"base_run={base}", *real, *common,
                              *judge),
            "scratch": train(out / "scratch", log, "experiment=minim_real_scratch", *real, *common, *judge)}
    table = pd.DataFrame([r for name, run in runs.items() for r in rows(name, run)])
    (out / "commands.txt").write_text("\n".join(log) + "\n")
    table.to_csv(out / "comparison.csv", index=False)
    (out / "comparison.json").write_text(table.to_json(orient="records", indent=2))
    shown = table.drop(columns=["run", "modality_ci"])
    (out / "comparison.md").write_text(shown.to_markdown(index=False, floatfmt=".3f") + "\n")
    print(shown.to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()
