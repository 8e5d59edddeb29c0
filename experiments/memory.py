"""Peak resident memory (RSS) of the entry points at their default settings: the figures in README -> Memory.

    python experiments/memory.py --out /tmp/mem            # every step, ~25 min on 2 cores
    python experiments/memory.py --out /tmp/mem --steps train,explain_ig

Each step is one real command, run as a child process; its peak RSS is the kernel's ``ru_maxrss`` of that
process (``os.wait4``), so it includes everything the command loads (torch, the data cached in memory,
Lightning). Steps that need a trained run make it first, at default settings but few epochs or steps
(memory does not depend on how well a model is trained):

  train         python train.py                                  (the default segmenter, 400 phantom images)
  explain_ig    python explain.py run_dir=<train>     (the default GlassBox suite: IG with 4 baselines, SHAP, occlusion,
                Grad-CAM, Score-CAM, SLIC, stability: an upper bound of IG alone)
  evaluate_1000 python evaluate.py run_dir=<train> data.source.n_images=1000 split=all   (1,000 images)
  generator     python train.py experiment=minim model.vae_run=<a minim_vae run> trainer.max_epochs=1
                trainer.limit_train_batches=20 (20 training steps, then the end-of-run evaluation)
  audit_1000    python evaluate.py audit=phantom audit.prompts.per_cell=21 (1,008 generated images + 800 real)
                with classifier runs of experiment=audit_pneumonia / audit_covid (1 epoch each)

The table (markdown) and ``memory.json`` are written to ``--out``; nothing is overwritten (a new ``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT_GIB = 4.0


def measure(args: list[str], log: Path) -> tuple[float, float]:
    """Run ``python <args>`` from the repository; return (peak RSS in GiB, seconds). Raises on failure."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "CI": "true"}
    t = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(args)} failed ({code}); see {log}")
    return usage.ru_maxrss / 2**20, time.perf_counter() - t


def steps(out: Path) -> dict[str, list[list[str]]]:
    """step -> commands (the last one is measured; the ones before make what it needs)."""
    train, vae = out / "runs" / "train", out / "runs" / "vae"
    pneu, covid = out / "runs" / "pneumonia", out / "runs" / "covid"
    return {
        "train": [["train.py", f"hydra.run.dir={train}"]],
        "explain_ig": [["explain.py", f"run_dir={train}", f"hydra.run.dir={out / 'runs' / 'explain'}"]],
        "evaluate_1000": [["evaluate.py", f"run_dir={train}", "data.source.n_images=1000", "split=all",
                           f"hydra.run.dir={out / 'runs' / 'evaluate'}"]],
        "generator": [["train.py", "experiment=minim_vae", "trainer.max_epochs=1", f"hydra.run.dir={vae}"],
                      ["train.py", "experiment=minim", f"model.vae_run={vae}", "trainer.max_epochs=1",
                       "trainer.limit_train_batches=20", "trainer.check_val_every_n_epoch=1", "test=false",
                       f"hydra.run.dir={out / 'runs' / 'gen'}"]],
        "audit_1000": [["train.py", "experiment=audit_pneumonia", "trainer.max_epochs=1", f"hydra.run.dir={pneu}"],
                       ["train.py", "experiment=audit_covid", "trainer.max_epochs=1", f"hydra.run.dir={covid}"],
                       ["evaluate.py", "audit=phantom", "audit.prompts.per_cell=21",
                        f"audit.classifiers.pneumonia=[{pneu}]", f"audit.classifiers.covid=[{covid}]",
                        f"hydra.run.dir={out / 'runs' / 'audit'}"]],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="a new folder for the runs, logs and the table")
    p.add_argument("--steps", default="train,explain_ig,evaluate_1000,generator,audit_1000")
    a = p.parse_args(argv)
    out = Path(a.out).resolve()
    if out.exists():
        p.error(f"--out {out} exists; give a new folder (nothing is overwritten)")
    plan = steps(out)
    wanted = a.steps.split(",")
    unknown = [s for s in wanted if s not in plan]
    if unknown:
        p.error(f"unknown steps {unknown}; choose from {list(plan)}")
    if any(s in wanted for s in ("explain_ig", "evaluate_1000")) and "train" not in wanted:
        p.error("explain_ig and evaluate_1000 use the train step's run: include train")
    (out / "logs").mkdir(parents=True)
    rows = []
    for step in wanted:
        for k, cmd in enumerate(plan[step]):
            gib, sec = measure(cmd, out / "logs" / f"{step}_{k}.log")
            print(f"{step} [{k + 1}/{len(plan[step])}] {' '.join(cmd)}: {gib:.2f} GiB, {sec:.0f} s", flush=True)
        rows.append({"step": step, "command": "python " + " ".join(c for c in cmd if not c.startswith("hydra.run")),
                     "peak_rss_gib": round(gib, 2), "seconds": round(sec), "under_4_gib": gib < LIMIT_GIB})
    (out / "memory.json").write_text(json.dumps(rows, indent=2))
    table = "| step | command | peak RSS (GiB) | s |\n|---|---|---|---|\n" + "\n".join(
        f"| {r['step']} | `{r['command']}` | {r['peak_rss_gib']:.2f} | {r['seconds']} |" for r in rows)
    (out / "memory.md").write_text(table + "\n")
    print(table)
    return rows


if __name__ == "__main__":
    main()
