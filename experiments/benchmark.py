"""Benchmarks whose figures go into README's results table (each row measured in one run).

    python experiments/benchmark.py                 # all rows, default sizes (~3 min on 2 cores)
    python experiments/benchmark.py --rows seg_flops data.image_size=[96,128] data.batch_size=8

Rows:
  seg_throughput  training images/s of medtrust's segmentation task (Lightning Trainer with the
                  default callbacks and CSV logger) against a plain PyTorch loop with the same
                  model, batch, data loader, optimiser/scheduler and threads. Target ratio >= 0.90.
  seg_dropout     step time with element-wise vs channel dropout (model.net.dropout_mode).
  mc_dropout      batched MC dropout (T=20, batch 32, 128 px, resnet18) vs T full forward passes, and
                  whether both give the same samples for the same seed.
  scorecam        our batched Score-CAM (medtrust.xai.scorecam, empty masks scored once per image)
                  vs pytorch-grad-cam's ScoreCAM: resnet18 (1 channel, 2 classes, seeded random
                  weights), 8 images at 128 px (timed in interleaved slices of 2), class-logit
                  target at layer4, both with batch size 32 and the same threads; time ratio, mean
                  Pearson r of the maps, skipped fraction (~2-4 min on 2 cores).
  xai_callback    training with the explanation callback at its default settings vs without
                  (default config, all epochs, validation on): overhead ratio (target <= 0.15).
  wandb_overhead  fit time with logger=wandb (offline) / logger=csv.
  ddp             trainer=ddp on 2 CPU processes vs 1 process with 2 threads (fit time ratio).
  gen_throughput  training images/s of the generator task (experiment=minim, 400 phantom images,
                  untrained VAE: throughput does not depend on weights) against diffusers'
                  text-to-image loop written out with the same UNet, VAE, text encoder, batch,
                  clipping, EMAModel, loader and precision (bf16 autocast); medtrust with its latent
                  cache (the default) and without it. Target ratio >= 0.90.
  gen_bf16        training step time of the MINIM VAE and UNet in fp32 vs CPU bf16 autocast
                  (trainer.precision=bf16-mixed, the experiments' setting on this AVX512-BF16 CPU).
  lora_step       step time of LoRA (the seed's targets) vs full training of the same UNet and batch,
                  and LoRA's trainable share of the UNet (target <= 5 %).
  gen_samplers    (not in the default set) s/image and FID with a bootstrap CI of DDIM 50 / DDIM 25 /
                  DPM-Solver++ 10 on the test prompts of --generator-run <experiment=minim run>, judged
                  by its evaluator/ or by --gen-evaluator <an evaluate.py refit=true folder>'s.
  audit_time      (not in the default set) seconds of the audit (evaluate.py audit=phantom's steps) for ~1,000
                  generated images (1,008: 21 prompts per sex x race x age cell, with and without demographic
                  terms): generation alone (the phantom generator; with --generator-run also that generator
                  run at its own sampling settings), the classifiers (--audit-pneumonia, --audit-covid runs) on
                  the generated and the real images, and the statistics; with and without generation.
  seg_flops       achieved FLOP/s of one Attention U-Net training step (counted with
                  torch.utils.flop_counter) as a fraction of this machine's fp32 matmul FLOP/s,
                  both measured in this run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

import medtrust.runs.resolvers  # noqa: E402,F401
from medtrust.callbacks.checkpoint_io import AtomicCheckpointIO  # noqa: E402
from medtrust.runs.builders import build_task, instantiate_list  # noqa: E402


def compose_cfg(overrides: list[str], out_dir: Path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=False)
    cfg.paths.output_dir = str(out_dir)
    return cfg


class EpochTimer(L.Callback):
    """Wall time of each training epoch (excluding validation, which is disabled here)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.times.append(time.perf_counter() - self._t)


def medtrust_epochs(cfg, dm, epochs: int, out_dir: Path) -> list[float]:
    L.seed_everything(0, workers=True, verbose=False)
    cfg.paths.output_dir = str(out_dir)  # loggers and checkpoints of this repeat go to its own folder
    task = build_task(cfg)
    timer = EpochTimer()
    callbacks = [*instantiate_list(cfg.callbacks), timer]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=instantiate_list(cfg.logger),
                          plugins=[AtomicCheckpointIO()], max_epochs=epochs, limit_val_batches=0,
                          enable_progress_bar=False, default_root_dir=str(out_dir))
    trainer.fit(task, train_dataloaders=dm.train_dataloader())
    return timer.times


def plain_epochs(cfg, dm, epochs: int) -> list[float]:
    """The same model/loss/optimiser/scheduler/loader in a hand-written loop."""
    L.seed_everything(0, workers=True, verbose=False)
    net = instantiate(cfg.model.net)
    loss_fn = instantiate(cfg.loss)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.model.optimizer.lr, weight_decay=cfg.model.optimizer.weight_decay)
    loader = dm.train_dataloader()
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.model.optimizer.lr, total_steps=epochs * len(loader),
                                                pct_start=cfg.model.scheduler.pct_start)
    net.train()
    times = []
    for _ in range(epochs):
        t = time.perf_counter()
        for batch in loader:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(batch["image"]), batch["mask"])
            loss.backward()
            opt.step()
            sched.step()
        times.append(time.perf_counter() - t)
    return times


def row_seg_throughput(args) -> dict:
    out = Path(args.out) / "throughput"
    # validation is off in both loops, so early stopping (which monitors a val metric) is left out
    cfg = compose_cfg(["callbacks.early_stopping=null", *args.overrides], out)
    torch.set_num_threads(int(cfg.threads))
    dm = instantiate(cfg.data)
    dm.setup("fit")
    n = len(dm.dataset("train"))
    med, plain = [], []
    for rep in range(args.repeats):  # interleave so drift of the machine hits both equally
        plain += plain_epochs(cfg, dm, args.epochs)[1:]  # first epoch = warm-up
        med += medtrust_epochs(cfg, dm, args.epochs, out / f"rep{rep}")[1:]
    return throughput_row("seg_throughput", n, med, plain, cfg)


def throughput_row(name: str, n: int, med: list[float], plain: list[float], cfg) -> dict:
    """Images/s of medtrust and of the plain loop from their epoch times, and their ratio."""
    ips_med, ips_plain = n / statistics.median(med), n / statistics.median(plain)
    return {"row": name, "medtrust_img_per_s": round(ips_med, 2), "plain_img_per_s": round(ips_plain, 2),
            "ratio": round(ips_med / ips_plain, 3), "target": ">= 0.90", "images_per_epoch": n,
            "epochs_timed": len(med), "threads": int(cfg.threads), "batch_size": int(cfg.data.batch_size),
            "image_size": list(cfg.data.image_size)}


def matmul_flops(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def make_step(cfg):
    """One plain training step of the configured U-Net on a synthetic batch of the configured size."""
    net = instantiate(cfg.model.net)
    loss_fn = instantiate(cfg.loss)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    h, w = cfg.data.image_size
    x = torch.randn(int(cfg.data.batch_size), int(cfg.data.channels), int(h), int(w))
    y = (torch.rand(x.shape[0], 1, int(h), int(w)) > 0.7).float()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        opt.step()

    return step


def time_steps(step, reps: int) -> float:
    for _ in range(2):
        step()
    t = time.perf_counter()
    for _ in range(reps):
        step()
    return (time.perf_counter() - t) / reps


def row_seg_flops(args) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    cfg = compose_cfg(args.overrides, Path(args.out) / "flops")
    torch.set_num_threads(int(cfg.threads))
    step = make_step(cfg)

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    achieved = flops / time_steps(step, args.flop_steps)
    peak = matmul_flops()
    return {"row": "seg_flops", "step_gflop": round(flops / 1e9, 2), "achieved_gflops": round(achieved / 1e9, 1),
            "matmul_gflops": round(peak / 1e9, 1), "fraction": round(achieved / peak, 3),
            "note": "plain-loop reference about 0.5", "threads": int(cfg.threads)}


def row_seg_dropout(args) -> dict:
    """Step time with element-wise vs channel dropout (model.net.dropout_mode), same everything else."""
    times = {}
    for mode in ("element", "channel"):
        cfg = compose_cfg([*args.overrides, f"model.net.dropout_mode={mode}"], Path(args.out) / "dropout")
        torch.set_num_threads(int(cfg.threads))
        L.seed_everything(0, verbose=False)
        times[mode] = time_steps(make_step(cfg), args.flop_steps)
    return {"row": "seg_dropout", "element_step_s": round(times["element"], 4),
            "channel_step_s": round(times["channel"], 4),
            "speedup": round(times["element"] / times["channel"], 3), "threads": int(cfg.threads)}


def row_mc_dropout(args) -> dict:
    """Batched MC dropout (backbone once, T head passes in one batch) vs T full forward passes:
    resnet18, T=20, batch 32, 128 px; speed ratio and identity of the sampled logits (same seed)."""
    from medtrust.nets.classifier import TimmClassifier
    from medtrust.tasks.classification import ClassificationTask

    torch.set_num_threads(2)
    torch.manual_seed(0)
    task = ClassificationTask(TimmClassifier("resnet18", num_classes=2, in_chans=1, head_dropout=0.3),
                              torch.nn.CrossEntropyLoss(), torch.optim.AdamW, mc_samples=20).eval()
    x = torch.randn(32, 1, 128, 128)
    times = {}
    outs = {}
    for scope in ("head", "all", "head", "all"):  # interleaved, second round timed
        torch.manual_seed(1)
        t = time.perf_counter()
        outs[scope] = task.mc_logits(x, 20, scope)
        times[scope] = time.perf_counter() - t
    same = bool(torch.allclose(outs["head"], outs["all"], atol=1e-4))
    return {"row": "mc_dropout", "batched_s": round(times["head"], 3), "naive_s": round(times["all"], 3),
            "speedup": round(times["all"] / times["head"], 2), "target": ">= 10x (limit about T = 20x)",
            "same_samples": same, "max_abs_diff": float((outs["head"] - outs["all"]).abs().max())}


def row_scorecam(args) -> dict:
    """Our Score-CAM vs pytorch-grad-cam's ScoreCAM on the same model, images, target, batch size
    and threads (8 x 512 masked forward passes of resnet18 dominate both; timed once, interleaved). Wall
    and process-CPU times (the latter is less disturbed by other load on the machine); the work
    ratio (masked inputs scored by grad-cam / by us, padding included) is what the speedup tends to."""
    import functools

    import numpy as np
    import pytorch_grad_cam.score_cam as gc_score_cam
    import timm
    import tqdm
    from pytorch_grad_cam import ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from medtrust.xai.scorecam import _upsampled_range, score_cam

    n_images, slice_size, size, batch, category = 8, 2, 128, 32, 1
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=2, in_chans=1).eval()
    x = torch.randn(n_images, 1, size, size, generator=torch.Generator().manual_seed(1))
    scored = [0]

    def forward(z: torch.Tensor) -> torch.Tensor:
        scored[0] += z.shape[0]
        return model(z)[:, category]

    with torch.no_grad():  # warm-up, and the layer4 activations for the skipped fraction
        acts = []
        h = model.layer4.register_forward_hook(lambda m, i, o: acts.append(o))
        model(x)
        h.remove()
        lo, hi = _upsampled_range(acts[0], (size, size))
    skipped = float((lo == hi).float().mean())

    quiet = functools.partial(tqdm.tqdm, disable=True)
    orig_tqdm = gc_score_cam.tqdm
    gc_score_cam.tqdm = type("quiet_tqdm", (), {"tqdm": staticmethod(quiet)})  # no progress bars
    t_ours = c_ours = t_theirs = c_theirs = 0.0
    ours, theirs = [], []
    try:  # interleaved slices of the batch, so drift of the machine's load hits both equally
        for s in range(0, n_images, slice_size):
            xs = x[s:s + slice_size]
            t, c = time.perf_counter(), time.process_time()
            ours.append(score_cam(model, forward, "layer4", xs, batch_size=batch).numpy())
            t_ours, c_ours = t_ours + time.perf_counter() - t, c_ours + time.process_time() - c
            t, c = time.perf_counter(), time.process_time()
            with ScoreCAM(model=model, target_layers=[model.layer4]) as cam:
                cam.batch_size = batch
                theirs.append(cam(input_tensor=xs, targets=[ClassifierOutputTarget(category)] * xs.shape[0]))
            t_theirs, c_theirs = t_theirs + time.perf_counter() - t, c_theirs + time.process_time() - c
    finally:
        gc_score_cam.tqdm = orig_tqdm
    ours, theirs = np.concatenate(ours), np.concatenate(theirs)
    r = [float(np.corrcoef(a.ravel(), b.ravel())[0, 1]) for a, b in zip(ours, theirs)]
    k = acts[0].shape[1]
    return {"row": "scorecam", "ours_s": round(t_ours, 2), "grad_cam_s": round(t_theirs, 2),
            "speedup": round(t_theirs / t_ours, 3), "cpu_speedup": round(c_theirs / c_ours, 3),
            "pearson_mean": round(float(np.mean(r)), 6), "one_minus_pearson_max": f"{1 - min(r):.1e}",
            "skipped_fraction": round(skipped, 4),
            "inputs_scored": f"{scored[0] - n_images} vs {n_images * k}",  # minus the capture passes
            "work_ratio": round(n_images * k / (scored[0] - n_images), 3), "weights": "random (seed 0)",
            "images": f"{n_images}x1x{size}x{size} in slices of {slice_size}", "batch_size": batch,
            "threads": torch.get_num_threads()}


def fit_seconds(cfg, dm, out_dir: Path, extra_callbacks: list) -> float:
    """Wall time of trainer.fit (training + validation every epoch) with the default callbacks."""
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    cfg.paths.output_dir = str(out_dir)
    task = build_task(cfg)
    trainer = instantiate(cfg.trainer, callbacks=[*instantiate_list(cfg.callbacks), *extra_callbacks],
                          logger=instantiate_list(cfg.logger), plugins=[AtomicCheckpointIO()],
                          enable_progress_bar=False, default_root_dir=str(out_dir))
    t = time.perf_counter()
    trainer.fit(task, datamodule=dm)
    return time.perf_counter() - t


def row_xai_callback(args) -> dict:
    """Training with the explanation callback at its default settings (xai=segmentation: Grad-CAM at
    the last decoder layer, 8 fixed validation images, MC-dropout T=4 + hflip stability, every 5
    epochs plus the first and last) vs the same training without it."""
    from medtrust.callbacks.explanations import explanation_callbacks

    out = Path(args.out) / "xai_callback"
    cfg = compose_cfg(["xai=segmentation", "callbacks.early_stopping=null", *args.overrides], out)
    torch.set_num_threads(int(cfg.threads))
    dm = instantiate(cfg.data)
    dm.setup("fit")
    without, with_cb, own = [], [], []
    for rep in range(args.repeats):  # interleaved
        without.append(fit_seconds(cfg, dm, out / f"off{rep}", []))
        cbs = explanation_callbacks(cfg.xai, int(cfg.seed))
        with_cb.append(fit_seconds(cfg, dm, out / f"on{rep}", cbs))
        own.append(sum(cbs[0].seconds))
    a, b = statistics.median(without), statistics.median(with_cb)
    return {"row": "xai_callback", "fit_s_without": round(a, 1), "fit_s_with": round(b, 1),
            "overhead": round(b / a - 1, 3), "callback_own_s": round(statistics.median(own), 1),
            "own_fraction": round(statistics.median(own) / b, 3), "target": "<= 0.15",
            "epochs": int(cfg.trainer.max_epochs), "calls": len(cbs[0].seconds), "repeats": args.repeats}


def row_wandb_overhead(args) -> dict:
    """Fit time with logger=wandb (offline) vs logger=csv, same config, interleaved repeats."""
    out = Path(args.out) / "wandb_overhead"
    cfg_csv = compose_cfg(["callbacks.early_stopping=null", f"trainer.max_epochs={args.epochs}", *args.overrides], out)
    cfg_wb = compose_cfg(["callbacks.early_stopping=null", f"trainer.max_epochs={args.epochs}", "logger=wandb",
                          *args.overrides], out)
    torch.set_num_threads(int(cfg_csv.threads))
    dm = instantiate(cfg_csv.data)
    dm.setup("fit")
    csv, wb = [], []
    for rep in range(args.repeats):
        csv.append(fit_seconds(cfg_csv, dm, out / f"csv{rep}", []))
        wb.append(fit_seconds(cfg_wb, dm, out / f"wandb{rep}", []))
        import wandb

        wandb.finish()
    a, b = statistics.median(csv), statistics.median(wb)
    return {"row": "wandb_overhead", "fit_s_csv": round(a, 1), "fit_s_wandb_offline": round(b, 1),
            "ratio": round(b / a, 3), "epochs": args.epochs, "repeats": args.repeats}


def row_ddp(args) -> dict:
    """Training throughput of trainer=ddp with 2 CPU processes (1 thread each) vs 1 process with 2
    threads, by train.py end to end (fit time from metrics/val.json)."""
    import json
    import os
    import subprocess

    out = Path(args.out) / "ddp"
    res = {}
    for name, extra in (("single_2threads", ["threads=2"]), ("ddp_2x1thread", ["trainer=ddp", "trainer.devices=2", "threads=1"])):
        run = out / name
        env = {**os.environ, "CI": "true", "WANDB_MODE": "offline"}
        subprocess.run([sys.executable, str(ROOT / "train.py"), *extra, f"trainer.max_epochs={args.epochs}",
                        "callbacks.early_stopping=null", *args.overrides, f"hydra.run.dir={run}"],
                       check=True, env=env, capture_output=True)
        res[name] = json.loads((run / "metrics" / "val.json").read_text())["fit_seconds"]
    return {"row": "ddp", "fit_s_single": res["single_2threads"], "fit_s_ddp": res["ddp_2x1thread"],
            "throughput_ratio_ddp_over_single": round(res["single_2threads"] / res["ddp_2x1thread"], 3),
            "epochs": args.epochs}


# -- generator (MINIM) -------------------------------------------------------------------------------
GEN_BASE = ["experiment=minim", "model.vae_run=null", "model.allow_untrained_vae=true", "data.source.n_images=400", "callbacks.early_stopping=null"]


def plain_diffusers_epochs(cfg, dm, epochs: int) -> list[float]:
    """diffusers' text-to-image training loop written out (as in its train_text_to_image example):
    VAE encode, add noise, UNet with the text states, MSE, backward, clip, AdamW + OneCycle, EMAModel.
    The same UNet, condition encoder, VAE, text encoder, batch and loader as the medtrust task."""
    from diffusers.training_utils import EMAModel

    L.seed_everything(0, workers=True, verbose=False)
    task = build_task(cfg)
    den, vae, te, sched = task.denoiser, task.vae, task.text_encoder, task.noise_scheduler
    opt = torch.optim.AdamW([p for p in den.parameters() if p.requires_grad], lr=cfg.model.optimizer.lr,
                            weight_decay=cfg.model.optimizer.weight_decay)
    loader = dm.train_dataloader()
    lr_s = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.model.optimizer.lr, total_steps=epochs * len(loader),
                                               pct_start=cfg.model.scheduler.pct_start)
    ema = EMAModel(den.parameters(), decay=float(cfg.model.ema.decay))
    clip = float(cfg.trainer.gradient_clip_val or 0)
    amp = str(cfg.trainer.precision).startswith("bf16")  # as accelerate's mixed_precision="bf16" in the example
    den.train()
    times = []
    for _ in range(epochs):
        t = time.perf_counter()
        for batch in loader:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                with torch.no_grad():
                    z = vae.encode(batch["image"]).latent_dist.sample() * task.latent_scale
                noise = torch.randn_like(z)
                ts = torch.randint(0, sched.config.num_train_timesteps, (len(z),))
                states, mask, pooled = te(list(batch["text"]))
                pred = den(sched.add_noise(z, noise, ts), ts, states, mask, pooled, torch.as_tensor(batch["modality"]))
            loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(den.parameters(), clip)
            opt.step()
            lr_s.step()
            ema.step(den.parameters())
        times.append(time.perf_counter() - t)
    return times


def row_gen_throughput(args) -> dict:
    """Training images/s of the generator task (Lightning, default callbacks, CSV logger, EMA) vs
    :func:`plain_diffusers_epochs`, interleaved; target ratio >= 0.90."""
    out = Path(args.out) / "gen_throughput"
    cfg = compose_cfg([*GEN_BASE, *args.overrides], out)
    torch.set_num_threads(int(cfg.threads))
    dm = instantiate(cfg.data)
    dm.setup("fit")
    n = len(dm.dataset("train"))
    from omegaconf import OmegaConf

    no_cache = OmegaConf.merge(cfg, {"model": {"latent_cache": False}})
    med, med_enc, plain = [], [], []
    for rep in range(args.repeats):
        plain += plain_diffusers_epochs(cfg, dm, args.epochs)[1:]
        med += medtrust_epochs(cfg, dm, args.epochs, out / f"rep{rep}")[1:]
        med_enc += medtrust_epochs(no_cache, dm, args.epochs, out / f"rep{rep}_nocache")[1:]
    row = throughput_row("gen_throughput", n, med, plain, cfg)
    # the latent cache is built once at fit start (outside the timed epochs); without it medtrust
    # encodes every batch, as the plain loop does
    enc = throughput_row("gen_throughput", n, med_enc, plain, cfg)
    row.update({"medtrust_no_cache_img_per_s": enc["medtrust_img_per_s"], "ratio_no_cache": enc["ratio"],
                "precision": str(cfg.trainer.precision)})
    return row


def row_gen_bf16(args) -> dict:
    """Training step time of the MINIM autoencoder (experiment=minim_vae) and of the generator's UNet
    (experiment=minim) in fp32 and under CPU bf16 autocast (what trainer.precision=bf16-mixed does),
    synthetic batches of the configured size, interleaved repeats."""
    from omegaconf import OmegaConf

    cfg = compose_cfg([*GEN_BASE, *args.overrides], Path(args.out) / "gen_bf16")
    torch.set_num_threads(int(cfg.threads))
    gen, _, _ = _gen_step(cfg, False)
    vcfg = compose_cfg(["experiment=minim_vae", *args.overrides], Path(args.out) / "gen_bf16")
    vae = build_task(vcfg)
    vae.train()
    vopt = torch.optim.AdamW(vae.parameters(), lr=1e-4)
    b, (h, w) = int(vcfg.data.batch_size), vcfg.data.image_size
    vbatch = {"image": torch.rand(b, int(vcfg.data.channels), int(h), int(w)) * 2 - 1}

    def vstep():
        vopt.zero_grad(set_to_none=True)
        vae.training_step(vbatch, 0).backward()
        vopt.step()

    def amp(step, on: bool):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=on):
                step()
        return run

    times: dict[str, list[float]] = {k: [] for k in ("vae_fp32", "vae_bf16", "unet_fp32", "unet_bf16")}
    for _ in range(args.repeats):
        for name, step in (("vae", vstep), ("unet", gen)):
            times[f"{name}_fp32"].append(time_steps(amp(step, False), args.flop_steps))
            times[f"{name}_bf16"].append(time_steps(amp(step, True), args.flop_steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"row": "gen_bf16", "batch_size": b, **{f"{k}_s_per_step": round(v, 3) for k, v in med.items()}}
    out.update({"vae_speedup": round(med["vae_fp32"] / med["vae_bf16"], 2),
                "unet_speedup": round(med["unet_fp32"] / med["unet_bf16"], 2),
                "accelerator": str(OmegaConf.select(cfg, "trainer.accelerator"))})
    return out


def _gen_step(cfg, lora: bool):
    """One training step (loss, backward, AdamW) of the generator task on a synthetic batch."""
    over = {"model": {"lora": {"enabled": lora}}}
    from omegaconf import OmegaConf

    task = build_task(OmegaConf.merge(cfg, over))
    task.train()
    opt = torch.optim.AdamW([p for p in task.denoiser.parameters() if p.requires_grad], lr=1e-4)
    b, (h, w) = int(cfg.data.batch_size), cfg.data.image_size
    batch = {"image": torch.rand(b, int(cfg.data.channels), int(h), int(w)) * 2 - 1,
             "text": [f"chest X-ray: large opacity in the {('left', 'right')[i % 2]} lower lung" for i in range(b)],
             "modality": torch.zeros(b, dtype=torch.long)}

    def step():
        opt.zero_grad(set_to_none=True)
        task.training_step(batch, 0).backward()
        opt.step()

    unet = task.denoiser.unet
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    return step, trainable, sum(p.numel() for p in unet.parameters())


def row_lora_step(args) -> dict:
    """Step time of LoRA fine-tuning (model.lora.enabled=true, the seed's targets) vs full training of
    the same UNet and batch, and the trainable share of the UNet's parameters (target <= 5 %)."""
    cfg = compose_cfg([*GEN_BASE, *args.overrides], Path(args.out) / "lora_step")
    torch.set_num_threads(int(cfg.threads))
    full, n_full, total = _gen_step(cfg, False)
    lora, n_lora, _ = _gen_step(cfg, True)
    tf, tl = [], []
    for _ in range(args.repeats):
        tf.append(time_steps(full, args.flop_steps))
        tl.append(time_steps(lora, args.flop_steps))
    f, lo = statistics.median(tf), statistics.median(tl)
    return {"row": "lora_step", "full_s_per_step": round(f, 3), "lora_s_per_step": round(lo, 3),
            "ratio": round(lo / f, 3), "lora_trainable_share": round(n_lora / total, 4), "unet_parameters": total,
            "target": "share <= 0.05", "batch_size": int(cfg.data.batch_size)}


def row_gen_samplers(args) -> dict:
    """Seconds per image and FID (evaluator features, bootstrap 95 % CI over the generated images) of
    DDIM 50, DDIM 25 and DPM-Solver++ 10 on the same prompts and seeds of a trained generator run
    (``--generator-run``): the test prompts, the run's guidance, against the real test images."""
    import numpy as np

    from medtrust.evaluation.generation import choose_prompts, load_evaluators, split_items
    from medtrust.generation.evaluator import predict
    from medtrust.metrics import generation as gm
    from medtrust.runs.builders import rebuild_task
    from medtrust.runs.rundir import find_checkpoint, load_run_config

    if not args.generator_run:
        raise SystemExit("--rows gen_samplers needs --generator-run <a finished experiment=minim run folder>")
    run = Path(args.generator_run)
    rcfg = load_run_config(run)
    torch.set_num_threads(int(rcfg.threads or 2))
    task = rebuild_task(rcfg, find_checkpoint(run, "best")).eval()
    judge_dir = Path(args.gen_evaluator) if args.gen_evaluator else run  # e.g. an evaluate.py refit=true folder
    fitted = load_evaluators(judge_dir)
    if fitted is None:
        raise SystemExit(f"{judge_dir}: no evaluator/ folder (a finished generator run or a refit evaluation writes it)")
    net = fitted["_evaluator"]
    dm = instantiate(rcfg.data)
    items = split_items(dm, "test")
    chosen = choose_prompts(items, task.modalities, args.gen_prompts, 0)
    prompts = [items["texts"][i] for i in chosen]
    mods = [int(items["modality"][i]) for i in chosen]
    seeds = list(range(len(prompts)))
    real = predict(net, items["images"])["features"]
    out: dict = {"row": "gen_samplers", "images": len(prompts), "real_test_images": len(real), "run": str(run),
                 "judge": str(judge_dir), "guidance": float(task.sampling["guidance"])}
    rng = np.random.default_rng(0)
    boots = [rng.integers(0, len(prompts), len(prompts)) for _ in range(args.gen_boot)]
    ref: list[float] | None = None
    for name, sampler, steps in (("ddim50", "ddim", 50), ("ddim25", "ddim", 25), ("dpmpp10", "dpmsolver++", 10)):
        t = time.perf_counter()
        imgs = task.generate(prompts, mods, seeds, sampler=sampler, steps=steps)
        sec = (time.perf_counter() - t) / len(prompts)
        f = predict(net, imgs)["features"]
        fid = float(gm.fid_kid_from_features(real, f, 10)["fid"])
        bs = [float(gm.fid_kid_from_features(real, f[b], 10)["fid"]) for b in boots]
        out.update({f"{name}_s_per_image": round(sec, 3), f"{name}_fid": round(fid, 3)})
        if ref is None:
            ref, ref_fid = bs, fid
            continue
        # paired: the same resampled prompts/seeds for both samplers (bootstrap FID is biased upward
        # by duplicates; the bias cancels in the difference)
        d = np.asarray(bs) - np.asarray(ref)
        ci = [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))]
        out.update({f"{name}_fid_minus_ddim50": round(fid - ref_fid, 3), f"{name}_diff_ci": [round(c, 3) for c in ci],
                    f"{name}_equal_fid": bool(ci[0] <= 0 <= ci[1])})
    return out


def row_anomaly_steps(args) -> dict:
    """SAFEGEN: image AUROC (stratified bootstrap CI) against network evaluations per image, for K = 1, 2,
    5, 10, 25, 50 DDIM steps from t0 and the full ancestral chain from t0 (every DDPM step), each with the
    run's R draws, on the same fixed subset of the test benchmark of a trained anomaly run
    (``--anomaly-run``). Each setting gets its own residual statistics, fitted on the same first
    ``--anomaly-fit-images`` clean calibration images (the run's own are fitted at its K only) with the
    run's image score."""
    import numpy as np

    from medtrust.anomaly.scoring import AnomalyStats
    from medtrust.data.artifacts import ArtifactSpec
    from medtrust.evaluation.anomaly import _normalise, score_images, split_benchmark
    from medtrust.metrics.anomaly import auroc_with_ci
    from medtrust.runs.builders import rebuild_task
    from medtrust.runs.rundir import find_checkpoint, load_run_config
    from medtrust.tasks.anomaly import t0_levels

    if not args.anomaly_run:
        raise SystemExit("--rows anomaly_steps needs --anomaly-run <a finished experiment=safegen run folder>")
    run = Path(args.anomaly_run)
    rcfg = load_run_config(run)
    torch.set_num_threads(int(rcfg.threads or 2))
    task = rebuild_task(rcfg, find_checkpoint(run, "best")).eval()
    dm = instantiate(rcfg.data)
    fit_split = "cal" if dm.has_split("cal") else "val"
    ev = rcfg.get("evaluation") or {}
    spec = ArtifactSpec.from_config({**dict(ev.get("artifacts") or {}), "per_severity": args.anomaly_per_severity,
                                     "n_clean": args.anomaly_clean}, "evaluation.artifacts")
    rows = split_benchmark(dm, "test", spec)
    labels = np.array([r["label"] for r in rows])
    fit_imgs = dm.load_split(fit_split)[0][:args.anomaly_fit_images]
    fit_x = torch.stack([_normalise(t.float().div(255).permute(1, 2, 0).numpy(), dm.normalize) for t in fit_imgs])
    sc = task.score_cfg
    out: dict = {"row": "anomaly_steps", "run": str(run), "images": len(rows), "injected": int(labels.sum()),
                 "t0": task.recon_cfg["t0"], "r": int(task.recon_cfg["r"]), "image_score": sc["image_score"],
                 "statistics_fitted_on": f"{fit_split} (first {len(fit_imgs)} images)",
                 "run_default_k": int(task.recon_cfg["k"])}
    settings = [(f"ddim{k}", "ddim", k) for k in (1, 2, 5, 10, 25, 50) if k <= min(t0_levels(task.recon_cfg["t0"])) + 1]
    settings += [("full_chain", "ancestral", None)]
    for name, mode, k in settings:
        task.recon_cfg.update({"mode": mode, **({"k": k} if k else {})})
        t = time.perf_counter()
        res = torch.cat([task.residuals(fit_x[i:i + 32])[0] for i in range(0, len(fit_x), 32)])
        stats = AnomalyStats.fit(res, min_images=int(sc["min_clean_images"]), top_k_percent=float(sc["top_k_percent"]),
                                 sigma=float(task.recon_cfg["sigma"]), eps=float(sc["eps"]), fitted_on=fit_split,
                                 image_score=str(sc["image_score"]), excess_z=float(sc["excess_z"]))
        task.stats = stats
        t1 = time.perf_counter()
        scores, _, info = score_images(task, [r["image"] for r in rows], dm.normalize, stats)
        sec = (time.perf_counter() - t1) / len(rows)
        auc, ci = auroc_with_ci(scores["residual"], labels, n_boot=args.gen_boot, seed=0)
        out.update({f"{name}_evals": info["evaluations_per_image"], f"{name}_auroc": round(auc, 4),
                    f"{name}_auroc_ci": [round(c, 4) for c in ci] if ci else None, f"{name}_s_per_image": round(sec, 3),
                    f"{name}_fit_s": round(t1 - t, 1)})
        print(f"anomaly_steps {name}: {info['evaluations_per_image']} evaluations/image, AUROC {auc:.3f} {ci}", flush=True)
    return out


def row_audit_time(args) -> dict:
    """The audit's cost for ~1,000 generated images (see the module docstring)."""
    from omegaconf import OmegaConf

    from medtrust.audit.generators import PhantomGenerator, RunGenerator
    from medtrust.audit.prompts import build_prompt_set
    from medtrust.audit.run import audit_metrics, load_classifiers, predict, real_images

    if not (args.audit_pneumonia and args.audit_covid):
        raise SystemExit("--rows audit_time needs --audit-pneumonia <run> and --audit-covid <run> [<run> ...]")
    torch.set_num_threads(2)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=["audit=phantom", "audit.prompts.per_cell=21"])
    a = OmegaConf.to_container(cfg.audit, resolve=True)
    fnd, hal, attrs = a["finding"], a["hallucinated"], list(a["prompts"]["attributes"])
    f_clfs = load_classifiers([args.audit_pneumonia], fnd, "--audit-pneumonia", True, 0)
    h_clfs = load_classifiers(list(args.audit_covid), hal, "--audit-covid", True, 0)
    prompts = build_prompt_set(a["prompts"])
    t = time.perf_counter()
    r_img, r_df = real_images(a["real"], [fnd, hal], attrs)
    real_f, real_h = predict(f_clfs, r_img, "real"), predict(h_clfs, r_img, "real")
    real_s = time.perf_counter() - t
    out = {"row": "audit_time", "generated_images": len(prompts), "real_images": len(r_df),
           "classifiers": len(f_clfs) + len(h_clfs), "real_images_s": round(real_s, 1)}
    gens = [("phantom", PhantomGenerator(int(a["generator"]["size"]), 0, fnd, hal, {"hallucination": 0.2}))]
    if args.generator_run:
        gens.append(("generator_run", RunGenerator(args.generator_run, attributes=attrs)))
    for name, gen in gens:
        pr = prompts.assign(modality="cxr")
        t = time.perf_counter()
        images, table = gen.generate(pr)
        t_gen = time.perf_counter() - t
        gen_f, gen_h = predict(f_clfs, images, "generated"), predict(h_clfs, images, "generated")
        t_cls = time.perf_counter() - t - t_gen
        audit_metrics(table, gen_f, gen_h, r_df, real_f, real_h, fnd, hal, attrs, a)
        t_all = time.perf_counter() - t
        out.update({f"{name}_generation_s": round(t_gen, 1), f"{name}_classifiers_s": round(t_cls, 1),
                    f"{name}_statistics_s": round(t_all - t_gen - t_cls, 1),
                    f"{name}_without_generation_s": round(t_all - t_gen + real_s, 1),
                    f"{name}_with_generation_s": round(t_all + real_s, 1)})
        print(f"audit_time {name}: {out}", flush=True)
    return out


ROWS = {"seg_throughput": row_seg_throughput, "seg_flops": row_seg_flops, "seg_dropout": row_seg_dropout,
        "mc_dropout": row_mc_dropout, "scorecam": row_scorecam, "xai_callback": row_xai_callback,
        "wandb_overhead": row_wandb_overhead, "ddp": row_ddp, "gen_throughput": row_gen_throughput,
        "lora_step": row_lora_step, "gen_bf16": row_gen_bf16, "gen_samplers": row_gen_samplers,
        "anomaly_steps": row_anomaly_steps, "audit_time": row_audit_time}
DEFAULT_ROWS = [r for r in ROWS if r not in ("gen_samplers", "anomaly_steps", "audit_time")]  # these need trained runs


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"comma-separated subset of {list(ROWS)}")
    p.add_argument("--generator-run", default=None, help="gen_samplers: a finished experiment=minim run folder")
    p.add_argument("--gen-evaluator", default=None,
                   help="gen_samplers: the folder whose evaluator/ judges the images (default: the run's own)")
    p.add_argument("--gen-prompts", type=int, default=16, help="gen_samplers: test prompts per modality")
    p.add_argument("--gen-boot", type=int, default=200, help="gen_samplers: bootstrap resamples of the FID CI")
    p.add_argument("--anomaly-run", default=None, help="anomaly_steps: a finished experiment=safegen run folder")
    p.add_argument("--anomaly-per-severity", type=int, default=2, help="anomaly_steps: injected images per cohort and severity")
    p.add_argument("--anomaly-clean", type=int, default=40, help="anomaly_steps: clean test images")
    p.add_argument("--anomaly-fit-images", type=int, default=60, help="anomaly_steps: clean calibration images the "
                   "statistics of every setting are fitted on")
    p.add_argument("--audit-pneumonia", default=None, help="audit_time: an experiment=audit_pneumonia run")
    p.add_argument("--audit-covid", nargs="+", default=None, help="audit_time: experiment=audit_covid run(s)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per measurement (the first is warm-up)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats of each loop")
    p.add_argument("--flop-steps", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "runs" / "benchmark" / time.strftime("%Y-%m-%d_%H-%M-%S")))
    p.add_argument("overrides", nargs="*", default=[], help="config overrides, e.g. data.image_size=[96,96]")
    args = p.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    results = [ROWS[r](args) for r in rows]
    import pandas as pd

    df = pd.DataFrame(results)
    print(df.to_markdown(index=False))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    df.to_csv(Path(args.out) / "benchmark.csv", index=False)
    return results


if __name__ == "__main__":
    main()
