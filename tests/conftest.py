"""Shared fixtures: tiny phantom data on disk in every supported layout, and a trained tiny run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("CI", "true")  # quiet progress bars in subprocesses
# Draft figures: saving every run's figures at 110 dpi is about a third of a tiny run's time; the tests
# check that figures are drawn and saved, not their resolution (tests/unit/report tests the setting).
os.environ.setdefault("MEDTRUST_FIGURE_DPI", "40")
if os.environ.get("PYTEST_XDIST_WORKER"):  # make test runs one worker per core: one torch thread each
    import torch

    torch.set_num_threads(1)

# Overrides that make any segmentation run tiny (seconds on CPU).
TINY_MODEL = ["experiment=tiny", "threads=1"]
TINY = [*TINY_MODEL, "data.source.n_images=40", "data.source.size=32"]  # + a tiny phantom


def run_script(script: str, *args: str, cwd: Path = ROOT, check: bool = True, timeout: int = 600,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python <script> args...`` from the repository (``env``: extra environment variables) and return
    the completed process."""
    env = {**os.environ, "CI": "true", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0",
           **(env or {})}
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def refused(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``python <script> args...`` in this process, for a run that must be refused: the script's own
    ``__main__`` block (argument checks, Hydra, the error path) without a new interpreter's ~10 s of
    imports. Returns what ``run_script(..., check=False)`` would (return code, stdout, stderr) and
    fails if the script succeeded. Global state a run sets (RNG states, torch threads, cwd, argv,
    environment) is restored afterwards, so later tests in the worker see what they saw before."""
    import contextlib
    import io
    import random
    import runpy

    import torch
    from hydra.core.global_hydra import GlobalHydra

    from medtrust.runs import resolvers

    resolvers._FRESH.clear()  # the run-folder names a process chose: each script run is a new process
    state = (sys.argv[:], os.getcwd(), dict(os.environ), torch.get_rng_state(), np.random.get_state(),
             random.getstate(), torch.get_num_threads())
    out, err, code = io.StringIO(), io.StringIO(), 0
    os.environ.update({"CI": "true", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0"})
    os.chdir(ROOT)
    sys.argv = [str(ROOT / script), *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
        if not isinstance(exc.code, int) and exc.code is not None:
            err.write(str(exc.code))
    except Exception:  # noqa: BLE001 - HYDRA_FULL_ERROR=1 re-raises: the interpreter would print it and exit 1
        import traceback

        err.write(traceback.format_exc())
        code = 1
    finally:
        sys.argv, cwd, env, rng, nprng, pyrng, threads = state
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        torch.set_rng_state(rng)
        np.random.set_state(nprng)
        random.setstate(pyrng)
        torch.set_num_threads(threads)
        GlobalHydra.instance().clear()
        resolvers._FRESH.clear()
    if code == 0:
        raise AssertionError(f"{script} {' '.join(args)} was expected to be refused but succeeded:\n{out.getvalue()[-3000:]}")
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def run_script_capped(script: str, *args: str, max_rss_mb: int, timeout: int = 600) -> tuple[subprocess.CompletedProcess, float]:
    """``run_script`` under a resident-memory cap: the process is killed as soon as its RSS exceeds
    ``max_rss_mb`` (polled every 0.1 s from /proc), and its peak RSS (MB, from ``wait4``) is returned."""
    import signal
    import time

    env = {**os.environ, "CI": "true", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0"}
    import tempfile

    out_f, err_f = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # a full pipe would block the child
    proc = subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env, stdout=out_f,
                            stderr=err_f, text=True, start_new_session=True)
    deadline, killed, status, usage = time.time() + timeout, False, None, None
    while time.time() < deadline:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # reaps with its rusage (Popen.poll would reap without)
        if pid:
            break
        try:
            rss_kb = next(int(line.split()[1]) for line in open(f"/proc/{proc.pid}/status") if line.startswith("VmRSS"))
        except (OSError, StopIteration):
            rss_kb = 0
        if rss_kb > max_rss_mb * 1024:
            killed = True
            break
        time.sleep(0.1)
    else:
        killed = True
    if killed:
        os.killpg(proc.pid, signal.SIGKILL)
        os.wait4(proc.pid, 0)
        raise AssertionError(f"{script} {' '.join(args)} exceeded {max_rss_mb} MB resident memory (or {timeout} s) and was killed")
    proc.returncode = os.waitstatus_to_exitcode(status)
    out_f.seek(0), err_f.seek(0)
    out, err = out_f.read(), err_f.read()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), usage.ru_maxrss / 1024


@pytest.fixture(scope="session")
def phantom_records():
    from medtrust.data.phantoms.derm import PhantomDermSource

    return PhantomDermSource(n_images=12, size=32, seed=3).records()


@pytest.fixture(scope="session")
def csv_dataset(tmp_path_factory, phantom_records) -> Path:
    """A CSV manifest (relative paths, train/val/test split column, attributes) of phantom images."""
    root = tmp_path_factory.mktemp("csvdata")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rows = []
    for r in phantom_records:
        Image.fromarray(r["image"]).save(root / "images" / f"{r['id']}.png")
        Image.fromarray(r["mask"] * 255).save(root / "masks" / f"{r['id']}_mask.png")
        rows.append({"path": f"images/{r['id']}.png", "mask_path": f"masks/{r['id']}_mask.png", "label": "melanoma" if r["label"] else "nevus",
                     "patient_id": r["patient_id"], "sex": r["attrs"]["sex"]})
    df = pd.DataFrame(rows)
    # split by patient so the manifest is leak-free: first patients train, then val, then test
    pids = list(dict.fromkeys(df["patient_id"]))
    n = len(pids)
    split_of = {p: ("train" if k < n * 0.5 else "val" if k < n * 0.75 else "test") for k, p in enumerate(pids)}
    df["split"] = df["patient_id"].map(split_of)
    df.to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


@pytest.fixture(scope="session")
def isic_root(tmp_path_factory) -> Path:
    from medtrust.data.phantoms.derm import export_isic_layout

    return export_isic_layout(tmp_path_factory.mktemp("isic"), n_train=6, n_val=3, n_test=3, size=32, seed=1)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One tiny trained run folder (train.py end to end), shared by the tests that need a run."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    run_script("train.py", *TINY, f"hydra.run.dir={run_dir}")
    return run_dir


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path
