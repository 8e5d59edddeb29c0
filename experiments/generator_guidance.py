"""Finding and modality accuracy of a generator run's samples against the guidance scale, on the prompts
of one split: how `model.sampling.guidance` is chosen (on val, never on test).

    python experiments/generator_guidance.py --run <generator run> --evaluator <folder with evaluator/> \
        --split val --guidance 3,5,7 --steps 25 --per-modality 16

The evaluator is the judge that `evaluate.py` fits (`<run>` itself, or an `evaluate.py refit=true` folder).
Prints one line per guidance scale; writes nothing.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import medtrust.runs.resolvers  # noqa: E402,F401
from hydra.utils import instantiate  # noqa: E402
from medtrust.evaluation import generation as eg  # noqa: E402
from medtrust.runs.builders import rebuild_task  # noqa: E402
from medtrust.runs.rundir import find_checkpoint, load_run_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--evaluator", default=None, help="folder holding evaluator/ (default: --run)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--guidance", default="3,5,7")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--per-modality", type=int, default=16)
    ap.add_argument("--samples-per-prompt", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    run = Path(a.run)
    cfg = load_run_config(run)
    task = rebuild_task(cfg, find_checkpoint(run, "best")).eval()
    dm = instantiate(cfg.data)
    fitted = eg.load_evaluators(Path(a.evaluator or run))
    if fitted is None:
        raise SystemExit(f"no evaluator/ in {a.evaluator or run}; run evaluate.py on the generator first")
    net = fitted["_evaluator"]
    items = eg.split_items(dm, a.split)
    if items["label"] is None or "finding" not in net.heads:
        raise SystemExit(f"the {a.split} split of {run} has no finding labels (or its judge no finding head): "
                         "finding accuracy against guidance needs both")
    chosen = eg.choose_prompts(items, task.modalities, a.per_modality, 0)
    k = a.samples_per_prompt
    prompts = [items["texts"][i] for i in chosen for _ in range(k)]
    mods = np.array([int(items["modality"][i]) for i in chosen for _ in range(k)])
    asked = torch.tensor([int(items["label"][i]) for i in chosen for _ in range(k)])
    for g in (float(x) for x in a.guidance.split(",")):
        fake = task.generate(prompts, mods.tolist(), list(range(len(prompts))), sampler="ddim", steps=a.steps, guidance=g)
        pred = eg.predict(net, fake)
        ok = (pred["finding"] == asked).numpy()
        mod_ok = (pred["modality"].numpy() == mods)
        per = {task.modalities[j]: round(float(ok[mods == j].mean()), 3) for j in range(len(task.modalities))}
        print(f"{a.split} guidance={g} steps={a.steps} n={len(prompts)} finding={ok.mean():.3f} "
              f"modality={mod_ok.mean():.3f} per modality {per}", flush=True)


if __name__ == "__main__":
    main()
