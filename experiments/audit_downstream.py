"""Known-truth check of the audit's downstream figure: does adding synthetic images to a classifier's training
set help it on real test images? On phantoms the order is known: images labelled by what their prompt asked for
help more when the generator draws what was asked (more data of the real distribution) than when it often does
not (label noise). Measured (README): both help at this data size, the faithful generator 3x as much.

    python experiments/audit_downstream.py --pneumonia <audit_pneumonia run> --covid <audit_covid run> <run> \
        --out <folder> [--seeds 0 1 2] [--settings clean=1.0 noisy=0.3] [--per-cell 20]

For each setting ``name=tpr`` the phantom generator of ``conf/audit/phantom.yaml`` draws a requested finding in a
share ``tpr`` of the prompts that ask for it (``inject.tpr`` for both sexes: every prompt), and one audit writes its
images (``audit.save_images=true``); per seed, ``experiment=audit_pneumonia`` is trained once without and once per
setting with those images added (``experiment=audit_pneumonia_augmented``: val / test stay the real phantoms); a
last audit per setting pairs the runs (``audit.downstream``) and reports the AUROC / accuracy change on the shared
real test split with its CI. The ``--pneumonia`` / ``--covid`` runs are only the audit's own classifiers.
Every command runs through ``train.py`` / ``evaluate.py``, so each figure is reproducible from its folder. Prints
markdown; writes ``<out>/downstream.json`` (never over an existing folder).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, log: Path) -> None:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{script} {' '.join(args)} failed ({proc.returncode}); see {log}")
    print(f"  {script} {args[0]} ... {time.perf_counter() - t0:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pneumonia", nargs="+", required=True, help="the audit's classifier run(s) of the audited finding")
    p.add_argument("--covid", nargs="+", required=True, help="the audit's classifier run(s) of the unasked finding")
    p.add_argument("--settings", nargs="+", default=["clean=1.0", "noisy=0.3"],
                   help="name=tpr: the share of requested findings the generator draws")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--per-cell", type=int, default=20, help="audit prompts per sex x race x age cell (x2 variants)")
    p.add_argument("--train", nargs="*", default=[], help="more train.py overrides for every classifier")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    if out.exists():
        raise SystemExit(f"--out {out} exists; results are never written over (choose another folder)")
    settings = {}
    for s in args.settings:
        name, _, v = s.partition("=")
        if not name or not v or not 0 < float(v) <= 1:
            raise SystemExit(f"--settings {s!r}: expected name=tpr with tpr in (0, 1]")
        settings[name] = float(v)
    out.mkdir(parents=True)
    clf = [f"audit.classifiers.pneumonia=[{','.join(args.pneumonia)}]", f"audit.classifiers.covid=[{','.join(args.covid)}]",
           f"audit.prompts.per_cell={args.per_cell}"]
    result: dict[str, Any] = {"seeds": args.seeds, "per_cell": args.per_cell, "settings": {}}
    for name, tpr in settings.items():
        print(f"{name}: generating (tpr {tpr})", flush=True)
        _run("evaluate.py", "audit=phantom", *clf, "audit.save_images=true",
             f"audit.generator.inject.tpr={{sex: {{F: {tpr}, M: {tpr}}}}}", f"hydra.run.dir={out / name / 'images'}",
             log=out / f"{name}_images.log")
    runs: dict[str, list[str]] = {"baseline": [], **{n: [] for n in settings}}
    for seed in args.seeds:
        print(f"seed {seed}: training", flush=True)
        d = out / f"baseline_s{seed}"
        _run("train.py", "experiment=audit_pneumonia", f"seed={seed}", *args.train, f"hydra.run.dir={d}",
             log=out / f"baseline_s{seed}.log")
        runs["baseline"].append(str(d))
        for name in settings:
            d = out / name / f"s{seed}"
            _run("train.py", "experiment=audit_pneumonia_augmented", f"seed={seed}", *args.train,
                 f"data.train_extra.folder={out / name / 'images' / 'generated'}", f"hydra.run.dir={d}",
                 log=out / f"{name}_s{seed}.log")
            runs[name].append(str(d))
    rows = []
    for name, tpr in settings.items():
        _run("evaluate.py", "audit=phantom", *clf, f"audit.downstream.baseline=[{','.join(runs['baseline'])}]",
             f"audit.downstream.augmented=[{','.join(runs[name])}]", f"hydra.run.dir={out / name / 'downstream'}",
             log=out / f"{name}_downstream.log")
        m = json.loads((out / name / "downstream" / "metrics" / "audit.json").read_text())["downstream"]
        import pandas as pd

        gen = pd.read_csv(out / name / "images" / "generated" / "generated.csv")
        asked = gen[gen["label"] == 1]
        label_true = float((asked["truth_finding"] == 1).mean())
        result["settings"][name] = {"tpr": tpr, "n_synthetic": int(len(gen)), "positive_labels_true": label_true,
                                    "runs": runs[name], "baseline_runs": runs["baseline"], "downstream": m}
        a, c = m["auroc"], m["accuracy"]
        rows.append(f"| {name} | {tpr:.2f} | {len(gen)} ({label_true:.2f}) | {a['baseline']:.3f} | {a['augmented']:.3f} | "
                    f"**{a['diff']:+.3f}** [{a['diff_ci'][0]:+.3f}, {a['diff_ci'][1]:+.3f}] | "
                    f"{(a['diff_sd_across_pairs'] or 0):.3f} | {c['diff']:+.3f} [{c['diff_ci'][0]:+.3f}, {c['diff_ci'][1]:+.3f}] |")
    tmp = out / "downstream.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out / "downstream.json")
    print("| setting | tpr drawn | synthetic images (share of positive labels true) | AUROC without | with | change [95 % CI] | "
          "SD across seeds | accuracy change [95 % CI] |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return result


if __name__ == "__main__":
    main()
