"""What ``generate.py`` does: rebuild a generator run and write images with a CSV of how each was
made (prompt, modality, seed, sampler, steps, guidance), or export the run as a diffusers pipeline.

``lora=<folder>`` applies LoRA weights saved by a LoRA run to this (base) run first
(:mod:`medtrust.generation.lora`). ``selector.run=<run>`` scores every image with a quality selector
(:mod:`medtrust.generation.selector`): the CSV gets ``selector_score`` and ``selector_p_top``, and with
``selector.min_score`` only the images scoring at least that are written (``kept``; the others stay in
the CSV with no file, so what the filter removed can be audited).

Nothing is overwritten: an existing image or shard CSV stops the command. With ``n_shards`` > 1,
prompt rows ``i`` with ``i % n_shards == shard`` are this job's; every shard writes its own
``generated_shard<k>of<n>.csv`` next to the others (in ``out_dir``, or one folder per job), and
:func:`medtrust.data.sources.generated.read_generated` reads their union.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from medtrust.runs.builders import rebuild_task, setup_runtime, task_class
from medtrust.runs.rundir import RunDirError, allow_targets, check_run_dir, claim_run_dir, find_checkpoint, load_run_config
from medtrust.utils.io import write_csv, write_json
from medtrust.utils.logging import get_logger

log = get_logger(__name__)

PROMPT_COLUMNS = ("prompt", "modality")


def read_prompts(cfg: DictConfig) -> pd.DataFrame:
    """The prompt rows of this command: ``prompt`` + ``modality`` (one row), or a CSV's rows.

    Raises:
        ValueError: neither or both given, a CSV without ``prompt``/``modality`` or with an empty
            prompt, or a bad ``seed``/``n`` value, naming the row.
    """
    if cfg.get("prompts") and cfg.get("prompt"):
        raise ValueError("give prompt=... (with modality=...) or prompts=<csv>, not both")
    if cfg.get("prompts"):
        path = Path(str(cfg.prompts)).expanduser()
        if not path.is_file():
            raise ValueError(f"prompts={path}: file not found (expected a CSV with columns prompt, modality)")
        from medtrust.data.tables import read_table

        df = read_table(path, what="prompts CSV")
        missing = [c for c in PROMPT_COLUMNS if c not in df.columns]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; expected prompt, modality (+ optional seed, n)")
        where = lambda i: f"{path} row {i + 2}"  # noqa: E731 - header is row 1
    elif cfg.get("prompt"):
        if cfg.get("modality") in (None, ""):
            raise ValueError("prompt=... needs modality=<name> (one of the run's modalities)")
        df = pd.DataFrame([{"prompt": str(cfg.prompt), "modality": str(cfg.modality)}])
        where = lambda i: "prompt=..."  # noqa: E731
    else:
        raise ValueError('give prompt="..." modality=<name>, or prompts=<csv>')
    if df.empty:
        raise ValueError(f"{cfg.get('prompts')}: no prompt rows")
    for i, row in df.iterrows():
        if not str(row["prompt"]).strip():
            raise ValueError(f"{where(i)}: empty prompt; expected the text to generate from")
        for col, lo in (("seed", 0), ("n", 1)):
            if col in df.columns and str(row[col]).strip():
                try:
                    v = int(str(row[col]))
                except ValueError:
                    raise ValueError(f"{where(i)}: {col}={row[col]!r}; expected an integer >= {lo}") from None
                if v < lo:
                    raise ValueError(f"{where(i)}: {col}={v}; expected an integer >= {lo}")
    df.insert(0, "row", range(len(df)))
    return df


def plan_images(df: pd.DataFrame, n: int, seed: int, shard: int, n_shards: int) -> list[dict[str, Any]]:
    """One entry per image of this shard; seeds are global (row order), so sharding never changes an
    image: image ``k`` of row ``r`` has seed ``row seed + k`` (a row without a seed starts at
    ``seed + the number of images before it``)."""
    if n_shards < 1 or not 0 <= shard < n_shards:
        raise ValueError(f"shard={shard}, n_shards={n_shards}; expected 0 <= shard < n_shards")
    plan, offset = [], 0
    for _, row in df.iterrows():
        k_n = int(row["n"]) if "n" in df.columns and str(row["n"]).strip() else int(n)
        first = int(row["seed"]) if "seed" in df.columns and str(row["seed"]).strip() else int(seed) + offset
        if int(row["row"]) % n_shards == shard:
            extra = {c: row[c] for c in df.columns if c not in ("row", "prompt", "modality", "seed", "n")}
            for k in range(k_n):
                plan.append({"row": int(row["row"]), "sample": k, "prompt": str(row["prompt"]),
                             "modality": str(row["modality"]), "seed": first + k, **extra})
        offset += k_n
    return plan


def _save_png(img: Any, path: Path) -> None:
    """Write a PNG atomically, refusing to replace an existing file."""
    if path.exists():
        raise FileExistsError(f"{path} exists; generated images are never overwritten (choose another out_dir)")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    arr = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype("uint8")
    Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(tmp, format="PNG")
    os.link(tmp, path)  # fails if path appeared meanwhile: never replaced
    tmp.unlink()


def generate(cfg: DictConfig) -> dict[str, Any]:
    """Run ``generate.py``: images + CSV, or ``save_pretrained``."""
    setup_runtime(cfg)
    allow_targets((cfg.get("security") or {}).get("allow_targets"))
    run_dir = check_run_dir(cfg.run_dir)
    cls = task_class(run_dir)
    if not hasattr(cls, "generate"):
        raise RunDirError(f"run_dir={run_dir}: a {cls.task_name} run cannot generate images (train one with "
                          "model=latent_diffusion)")
    run_cfg = load_run_config(run_dir)
    run_cfg.paths = cfg.paths
    sel_cfg = cfg.get("selector") or {}
    if sel_cfg.get("min_score") is not None and not sel_cfg.get("run"):
        raise ValueError("selector.min_score needs selector.run=<a selector run> (python train.py experiment=minim_selector ...)")
    ckpt = find_checkpoint(run_dir, str(cfg.checkpoint))
    task = rebuild_task(run_cfg, ckpt)
    lora_info = None
    if cfg.get("lora"):
        from medtrust.generation.lora import apply_lora

        lora_info = apply_lora(task, str(cfg.lora), bool(cfg.get("lora_allow_other_base", False)))
    selector = None
    if sel_cfg.get("run"):
        from medtrust.generation.selector import Selector

        selector = Selector.from_run(str(sel_cfg.run), seed=int(sel_cfg.get("seed", 0)))
    hydra_dir = Path(HydraConfig.get().runtime.output_dir)
    if cfg.get("save_pretrained") and lora_info is not None:
        raise ValueError("save_pretrained with lora=...: export the LoRA run itself (its checkpoint holds base + adapters)")
    if cfg.get("save_pretrained"):
        from medtrust.generation.pipeline import export_pipeline

        folder = export_pipeline(task, Path(str(cfg.save_pretrained)).expanduser())
        write_json(hydra_dir / "exported.json", {"run_dir": str(run_dir.resolve()), "checkpoint": str(ckpt),
                                                 "pipeline": str(folder.resolve())})
        log.info(f"pipeline written to {folder} (MedtrustLatentDiffusionPipeline.from_pretrained('{folder}'))")
        return {"pipeline": str(folder)}
    df = read_prompts(cfg)
    for i, m in enumerate(df["modality"]):
        try:
            task.modality_index(m)
        except ValueError as err:
            raise ValueError(f"{cfg.get('prompts') or 'modality='} row {i + 2 if cfg.get('prompts') else ''}: {err}") from None
    shard, n_shards = int(cfg.shard), int(cfg.n_shards)
    plan = plan_images(df, int(cfg.n), int(cfg.seed), shard, n_shards)
    out = Path(str(cfg.out_dir)).expanduser() if cfg.get("out_dir") else hydra_dir
    if not cfg.get("out_dir"):
        claim_run_dir(out, {"kind": "generation", "run_dir": str(run_dir.resolve())})
    (out / "images").mkdir(parents=True, exist_ok=True)
    name = "generated.csv" if n_shards == 1 else f"generated_shard{shard}of{n_shards}.csv"
    if (out / name).exists():
        raise FileExistsError(f"{out / name} exists; a shard's images are never overwritten (choose another out_dir)")
    # an empty DictConfig is falsy: `cfg.get("sampling") or {}` gave a plain dict that to_container refuses
    sampling = cfg.get("sampling")
    overrides = OmegaConf.to_container(sampling, resolve=True) if sampling is not None else {}
    settings = task.sampling_record(**overrides)
    imgs = task.generate([p["prompt"] for p in plan], [p["modality"] for p in plan], [p["seed"] for p in plan],
                         batch_size=int(cfg.batch_size), **{k: settings[k] for k in
                                                            ("sampler", "steps", "guidance", "guidance_schedule",
                                                             "min_guidance", "negative_prompt")})
    scores = p_top = None
    kept = [True] * len(plan)
    if selector is not None:
        scores, p_top = selector.score(imgs, str(sel_cfg.get("score", "expected")))
        if sel_cfg.get("min_score") is not None:
            kept = [bool(v >= float(sel_cfg.min_score)) for v in scores]
    keep_rejected = bool(sel_cfg.get("keep_rejected", False))
    if keep_rejected:
        (out / "rejected").mkdir(exist_ok=True)
    rows = []
    for i, (p, img) in enumerate(zip(plan, imgs)):
        stem = f"r{p['row']:06d}_s{p['sample']:03d}_seed{p['seed']}.png"
        f = Path("images" if kept[i] else "rejected") / stem
        if kept[i] or keep_rejected:
            _save_png(img, out / f)
        row = {"file": f.as_posix() if kept[i] else "", **p, **settings, "run_dir": str(run_dir.resolve()),
               "checkpoint": str(ckpt), "shard": shard, "n_shards": n_shards}
        if lora_info is not None:
            row["lora"] = str(Path(str(cfg.lora)).expanduser().resolve())
        if selector is not None:
            row.update(selector_run=str(selector.run_dir.resolve()), selector_score=float(scores[i]),
                       selector_p_top=float(p_top[i]), kept=int(kept[i]))
            if keep_rejected and not kept[i]:
                row["rejected_file"] = f.as_posix()
        rows.append(row)
    write_csv(out / name, pd.DataFrame(rows))
    n_kept = sum(kept)
    log.info(f"{len(rows)} images ({len(df)} prompt rows, shard {shard}/{n_shards}) -> {out}"
             + (f"; the selector kept {n_kept} (score >= {sel_cfg.min_score})" if selector is not None
                and sel_cfg.get("min_score") is not None else ""))
    return {"out_dir": str(out), "n_images": len(rows), "n_kept": n_kept, "csv": str(out / name)}

