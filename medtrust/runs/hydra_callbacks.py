"""Hydra callbacks: a summary table of a multirun's jobs."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from medtrust.report.summary import scalar_metrics
from medtrust.utils.io import atomic_write_bytes


def summarize_sweep(sweep_dir: str | Path, split: str = "test") -> pd.DataFrame:
    """One row per job folder under ``sweep_dir``: its overrides and the scalar metrics of
    ``metrics/<split>.json`` (falls back to ``val`` for jobs without a test split)."""
    rows: list[dict[str, Any]] = []
    for job in sorted((p for p in Path(sweep_dir).iterdir() if p.is_dir()), key=lambda p: (len(p.name), p.name)):
        ov = job / ".hydra" / "overrides.yaml"
        if not ov.exists():
            continue
        row: dict[str, Any] = {"job": job.name, "overrides": " ".join(OmegaConf.load(ov))}
        status = job / "status.json"
        row["status"] = json.loads(status.read_text()).get("status", "?") if status.exists() else "?"
        mfile = job / "metrics" / f"{split}.json"
        used = split
        if not mfile.exists():
            mfile, used = job / "metrics" / "val.json", "val"
        if mfile.exists():
            m = json.loads(mfile.read_text())
            row["split"] = used
            row.update(scalar_metrics(m))
        else:
            row["split"] = "failed (no metrics)"
        rows.append(row)
    return pd.DataFrame(rows)


def write_summary(sweep_dir: str | Path, split: str = "test") -> pd.DataFrame:
    """Write ``summary.csv`` and ``summary.md`` into ``sweep_dir``."""
    df = summarize_sweep(sweep_dir, split)
    sweep_dir = Path(sweep_dir)
    atomic_write_bytes(sweep_dir / "summary.csv", df.to_csv(index=False).encode())
    md = df.to_markdown(index=False, floatfmt=".4f") if len(df) else "(no jobs)"
    atomic_write_bytes(sweep_dir / "summary.md", (md + "\n").encode())
    return df


class MultirunSummary(Callback):
    """After a multirun, tabulate every job's test metrics (CSV + markdown) in the sweep folder."""

    def __init__(self, split: str = "test") -> None:
        self.split = split

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.exists():
            write_summary(sweep_dir, self.split)
