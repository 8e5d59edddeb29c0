"""Stage 2 of latent diffusion (MINIM): a text- and modality-conditioned ``UNet2DConditionModel``
denoising the latents of a frozen ``AutoencoderKL``.

- Text: a frozen transformers encoder (MiniLM offline by default, PubMedBERT or any local folder by
  config); its token states are the cross-attention context.
- Modality: MINIM's learned modality embedding fused with the pooled text embedding (Hadamard
  product + linear, :class:`~medtrust.nets.diffusion.ModalityFusion`), fed to the UNet as its class
  embedding and/or as an extra context token (``model.conditioning``).
- Training: condition dropout for classifier-free guidance (the text becomes ``""`` and the
  modality the learned null modality), EMA weights (evaluated and sampled), min-SNR loss weighting,
  gradient clipping and warm-up from the trainer/scheduler configs. The frozen VAE's posterior of each
  training image (mean and std) is computed once at fit start when the training pixels never change
  (``model.latent_cache``); every step still draws a fresh latent from it, as encoding would. ``model.lora.enabled=true``
  freezes the UNet and trains peft LoRA adapters on the cross-attention, the mid-block
  self-attention and the output layers (start from a generator run with ``model.init_from``); its
  weights alone are written to ``<run>/lora/`` (:mod:`medtrust.generation.lora`). A base run whose
  modalities differ keeps the embedding of every modality it shares by name; a new modality starts
  from the mean of the base's embeddings.
- Rating-driven fine-tuning (MINIM's RLHF step, ``model.reward.enabled``): the training images are the
  generator's own samples with a ``reward`` (a selector's score); each sample's denoising loss is
  weighted by ``exp((r - mean r) / temperature)`` (reward-weighted regression, normalised to mean 1 over
  the training set and clipped) or by ``r >= threshold`` (filtered fine-tuning), plus ``kl_weight`` times
  the distance of the LoRA prediction to the base prediction (adapters off) on the same noisy latents,
  which keeps the fine-tuned generator close to the one it started from.
- Sampling: DDIM, DPM-Solver++ or DDPM with guidance, negative prompts and a guidance schedule
  (:mod:`medtrust.generation.sampling`). Every image has its own seed: its initial noise depends on
  that seed alone, so the same seed gives the same image in any batch.

The VAE comes from a stage-1 run (``model.vae_run=<autoencoder run>``: weights and latent scaling
factor) or a local diffusers folder, and is stored inside this run's checkpoint, so a generator run
is self-contained but for the (named) text encoder.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn as nn

from medtrust.generation.sampling import (diffusion_target, sample_latents, sampling_scheduler, sampling_settings,
                                          training_scheduler)
from medtrust.nets.diffusion import ConditionEncoder, TextEncoder, add_lora, lora_state_dict
from medtrust.tasks.base import EvalResult, ReportSection, RunModel, TaskBase, TrustLine, load_init_weights
from medtrust.utils.io import load_tensors
from medtrust.utils.logging import get_logger

log = get_logger(__name__)


class Denoiser(nn.Module):
    """What is trained (and averaged by EMA): the UNet and the condition encoder (modality fusion and
    context-token projection)."""

    def __init__(self, unet: nn.Module, cond: ConditionEncoder) -> None:
        super().__init__()
        self.unet, self.cond = unet, cond

    def forward(self, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor,
                modality: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, **self.cond(states, mask, pooled, modality)).sample


def _ema_avg(decay: float):
    def avg(averaged: torch.Tensor, current: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        if torch.equal(averaged, current):  # a frozen weight (LoRA's base) stays bit-identical
            return averaged
        d = min(decay, (1.0 + float(num)) / (10.0 + float(num)))  # warm-up, as diffusers' EMAModel
        return d * averaged + (1.0 - d) * current
    return avg


REWARD_WEIGHTINGS = ("exp", "threshold")
REWARD_BASELINES = ("global", "modality")


def reward_settings(reward: Mapping[str, Any] | None, lora: bool) -> dict[str, Any]:
    """Validated ``model.reward`` settings (rating-driven fine-tuning).

    Raises:
        ValueError: an unknown weighting, a temperature <= 0, a max weight <= 0, or a KL weight
            without LoRA (the base prediction comes from the same UNet with its adapters off).
    """
    r = {"enabled": False, "weighting": "exp", "temperature": 0.25, "threshold": None, "max_weight": 10.0,
         "kl_weight": 0.0, "baseline": "global", **dict(reward or {})}
    if not r["enabled"]:
        return r
    if r["baseline"] not in REWARD_BASELINES:
        raise ValueError(f"model.reward.baseline={r['baseline']!r}; expected one of {REWARD_BASELINES}")
    if r["weighting"] not in REWARD_WEIGHTINGS:
        raise ValueError(f"model.reward.weighting={r['weighting']!r}; expected one of {REWARD_WEIGHTINGS}")
    if r["weighting"] == "exp" and not float(r["temperature"]) > 0:
        raise ValueError(f"model.reward.temperature must be > 0, got {r['temperature']}")
    if r["weighting"] == "threshold" and r["threshold"] is None:
        raise ValueError("model.reward.weighting=threshold needs model.reward.threshold (the lowest reward kept)")
    if not float(r["max_weight"]) > 0:
        raise ValueError(f"model.reward.max_weight must be > 0, got {r['max_weight']}")
    if float(r["kl_weight"]) > 0 and not lora:
        raise ValueError("model.reward.kl_weight > 0 needs model.lora.enabled=true (the base prediction is the UNet "
                         "with its adapters off)")
    return r


class GenerationTask(TaskBase):
    """Latent diffusion conditioned on text and modality.

    Args:
        unet: a ``UNet2DConditionModel`` (``medtrust.nets.diffusion.conditional_unet``).
        vae: an ``AutoencoderKL`` (its weights come from ``vae_run`` or its own folder).
        loss: :class:`medtrust.losses.diffusion.DiffusionLoss`.
        optimizer, scheduler, scheduler_interval: partials, as every task.
        modalities: modality names; a record's ``modality`` indexes this list.
        text_encoder: ``{name, max_length, cache_size}`` of :class:`TextEncoder`.
        noise: ``{num_train_timesteps, beta_schedule, prediction_type}`` of the training scheduler.
        conditioning: ``{class_embedding, context_token, p_uncond}``.
        ema: ``{enabled, decay}``.
        lora: ``{enabled, rank, alpha, dropout, target_modules, train_condition_encoder, quantize}``
            (``quantize``: ``nf4`` / ``fp4`` QLoRA on a CUDA GPU; an error on the CPU).
        reward: ``{enabled, weighting (exp | threshold), temperature, threshold, max_weight, kl_weight,
            baseline (global | modality)}``
            (rating-driven fine-tuning; training batches carry ``reward``).
        sampling: default ``{sampler, steps, guidance, guidance_schedule, min_guidance, negative_prompt}``.
        vae_run: a stage-1 autoencoder run folder (weights + ``vae_stats.json``), loaded at fit start.
        scaling_factor: the latent scaling factor when no ``vae_run`` gives it.
        val_timesteps: fixed timesteps of the validation loss (same noise every epoch).
        init_from: a checkpoint whose matching weights initialise the task (LoRA: the base generator).
        allow_untrained_vae: fit without ``vae_run``, ``init_from`` or a pretrained VAE folder (timing
            benchmarks only: the latents of a random autoencoder mean nothing).
        latent_cache: ``auto`` (cache the training posteriors when the data module says its training
            pixels are fixed and they fit in ``latent_cache_max_mb``), ``true`` (the same, an error when
            they are not fixed) or ``false`` (encode every batch).
        latent_cache_max_mb: the memory the cache may take (auto only).
    """

    task_name: ClassVar[str] = "generation"
    metric_group: ClassVar[str] = "gen"
    evaluation_config: ClassVar[str] = "generation"
    xai_target_kinds: ClassVar[tuple[str, ...]] = ("denoising_error",)
    # a trained run's checkpoint holds its VAE: rebuilding needs neither vae_run nor init_from
    rebuild_overrides: ClassVar[dict[str, Any]] = {"init_from": None, "allow_untrained_vae": True}

    def __init__(self, unet: nn.Module, vae: nn.Module, loss: nn.Module, optimizer: Any, modalities: Sequence[str],
                 text_encoder: Mapping[str, Any] | None = None, noise: Mapping[str, Any] | None = None,
                 conditioning: Mapping[str, Any] | None = None, ema: Mapping[str, Any] | None = None,
                 lora: Mapping[str, Any] | None = None, sampling: Mapping[str, Any] | None = None,
                 scheduler: Any = None, scheduler_interval: str = "step", vae_run: str | None = None,
                 scaling_factor: float | None = None, val_timesteps: Sequence[int] = (100, 300, 500, 700, 900),
                 monitor: str = "val/gen/loss", monitor_mode: str = "min", init_from: str | None = None,
                 allow_untrained_vae: bool = False, latent_cache: bool | str = "auto",
                 latent_cache_max_mb: float = 2048, reward: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if not (vae_run or init_from or getattr(vae, "medtrust_source", None) or allow_untrained_vae):
            raise ValueError("model.vae_run is not set: stage 2 needs a trained autoencoder, a finished "
                             "`python train.py experiment=minim_vae` run folder (or model.vae from a pretrained folder, "
                             "or model.init_from a generator checkpoint)")
        self.save_hyperparameters(ignore=["unet", "vae", "loss", "optimizer", "scheduler"])
        self.modalities = [str(m) for m in modalities]
        if not self.modalities:
            raise ValueError("model.modalities is empty; expected the modality names of the data")
        te = dict(text_encoder or {})
        # frozen and outside the module tree: never in a checkpoint (22 M parameters), named in the config
        object.__setattr__(self, "text_encoder", TextEncoder(**te))
        cond = {"class_embedding": True, "context_token": True, "p_uncond": 0.1, **dict(conditioning or {})}
        self.conditioning = cond
        dim = self.text_encoder.dim
        ca = int(unet.config.cross_attention_dim)
        if ca != dim:
            raise ValueError(f"model.unet.cross_attention_dim={ca} but the text encoder {te.get('name')} gives "
                             f"{dim}-d token states; set model.unet.cross_attention_dim={dim}")
        fused_dim = int(unet.config.projection_class_embeddings_input_dim or dim) if cond["class_embedding"] else dim
        if cond["class_embedding"] and unet.config.class_embed_type != "projection":
            raise ValueError("model.conditioning.class_embedding=true needs a UNet built with a class embedding "
                             "(model.unet.class_embedding_dim)")
        self.denoiser = Denoiser(unet, ConditionEncoder(self.modalities, dim, fused_dim, bool(cond["class_embedding"]),
                                                        bool(cond["context_token"])))
        self.vae = vae
        for p in self.vae.parameters():
            p.requires_grad_(False)
        self.register_buffer("latent_scale", torch.tensor(float(scaling_factor or 1.0)))
        self.vae_run = vae_run
        self.noise_scheduler = training_scheduler(**dict(noise or {}))
        self.sampling = sampling_settings(sampling)
        self.loss = loss
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.scheduler_interval, self.monitor = scheduler_interval, monitor
        self.val_timesteps = [int(t) for t in val_timesteps]
        self.init_report = self._init_from(init_from) if init_from else None
        lo = {"enabled": False, "rank": 8, "alpha": None, "dropout": 0.0, "train_condition_encoder": True,
              "quantize": None, **dict(lora or {})}
        self.lora_cfg = lo
        self.lora_params: dict[str, float] | None = None
        self.reward_cfg = reward_settings(reward, bool(lo["enabled"]))
        self.base_fingerprint: str | None = None
        if lo["enabled"]:
            from medtrust.generation.lora import base_fingerprint, check_quantize, quantize_linear_layers

            quant = check_quantize(lo.get("quantize"))  # QLoRA: a clear error without a CUDA GPU
            if quant:  # the fingerprint of the base weights before 4-bit quantisation changes them
                self.base_fingerprint = base_fingerprint(self.denoiser.unet)
                n = quantize_linear_layers(self.denoiser.unet, quant)
                log.info(f"QLoRA: {n} linear layers of the UNet quantised to 4 bit ({quant})")
            kwargs = {k: lo[k] for k in ("rank", "alpha", "dropout") if lo.get(k) is not None}
            if lo.get("target_modules"):
                kwargs["target_modules"] = lo["target_modules"]
            self.lora_params = add_lora(self.denoiser.unet, **kwargs)
            # the condition encoder (small) is trained with the adapters unless told not to: a new modality
            # needs its embedding; rating-driven fine-tuning trains the adapters alone
            for p in self.denoiser.cond.parameters():
                p.requires_grad_(bool(lo["train_condition_encoder"]))
            log.info(f"LoRA: {self.lora_params['trainable']:,} of {self.lora_params['total']:,} UNet parameters "
                     f"trainable ({100 * self.lora_params['share']:.2f} %)")
        e = {"enabled": True, "decay": 0.999, **dict(ema or {})}
        self.ema = (torch.optim.swa_utils.AveragedModel(self.denoiser, avg_fn=_ema_avg(float(e["decay"])), use_buffers=True)
                    if e["enabled"] else None)
        self._uncond: dict[str, tuple[torch.Tensor, ...]] = {}
        if str(latent_cache).lower() not in ("auto", "true", "false"):
            raise ValueError(f"model.latent_cache={latent_cache!r}; expected auto, true or false")
        self.latent_cache_mode = str(latent_cache).lower()
        self.latent_cache_max_mb = float(latent_cache_max_mb)
        self._posteriors: tuple[torch.Tensor, torch.Tensor] | None = None  # train index -> (mean, std), CPU
        # reward normalisation (rating-driven fine-tuning): (mean reward, normaliser), fitted on the training
        # set's rewards at every fit start (also on resume); not a buffer, so older checkpoints still load
        self.reward_stats = torch.tensor([[0.0, 1.0]] * (len(self.modalities) + 1), dtype=torch.float64)
        self.reward_info: dict[str, float] | None = None

    def _init_from(self, path: str) -> dict[str, list[str]]:
        """Initialise from a generator checkpoint, taking its EMA weights when it has them (the ones it
        was evaluated and sampled with)."""
        p = Path(str(path)).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"model.init_from: checkpoint not found: {p}")
        try:
            state = load_tensors(p, "checkpoint")
        except ValueError as err:
            raise ValueError(f"model.init_from: {err}") from None
        sd = dict(state.get("state_dict", state))
        ema = {k[len("ema.module."):]: v for k, v in sd.items() if k.startswith("ema.module.")}
        if ema:
            sd = {k: v for k, v in sd.items() if not k.startswith("ema.")}
            sd.update({f"denoiser.{k}": v for k, v in ema.items()})
        base_mods = (state.get("hyper_parameters") or {}).get("modalities") if isinstance(state, dict) else None
        mapped = self._map_modalities(sd, list(base_mods) if base_mods else None)
        report = load_init_weights(self, p, state=sd)
        report["ema_weights"] = bool(ema)
        if mapped:
            report["modalities"] = mapped
        return report

    def _map_modalities(self, sd: dict[str, torch.Tensor], base: list[str] | None) -> dict[str, Any] | None:
        """Rewrite the base checkpoint's modality embedding (``sd``, in place) to this task's modalities:
        rows of shared names are kept, a new modality gets the mean of the base's rows, the null modality
        (the last row) stays the null modality."""
        key = "denoiser.cond.fusion.embedding.weight"
        if base is None or key not in sd or [str(m) for m in base] == self.modalities:
            return None
        old = sd[key]
        if old.shape[0] != len(base) + 1:
            return None
        rows = [old[base.index(m)] if m in base else old[:-1].mean(0) for m in self.modalities]
        sd[key] = torch.stack([*rows, old[-1]])
        shared = [m for m in self.modalities if m in base]
        new = [m for m in self.modalities if m not in base]
        log.info(f"model.init_from: modality embedding of {shared} kept from the base run; new {new} start from the "
                 f"mean of its {len(base)} modalities")
        return {"base": list(base), "shared": shared, "new": new, "dropped": [m for m in base if m not in self.modalities]}

    # -- stage 1 -----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Load the stage-1 autoencoder of ``vae_run`` at fit start. With ``init_from`` too, the VAE of
        ``vae_run`` replaces the one that came with the checkpoint (adapting a generator to a domain its
        own VAE cannot represent: the phantom VAE reconstructs real images at about 13 dB PSNR)."""
        if stage == "fit" and self.vae_run:
            from medtrust.tasks.autoencoder import read_vae_run

            if self.init_report:
                log.info(f"model.vae_run={self.vae_run} replaces the VAE of model.init_from")

            weights, stats = read_vae_run(self.vae_run)
            try:
                self.vae.load_state_dict(weights, strict=True)
            except RuntimeError as err:
                raise ValueError(f"model.vae does not match the autoencoder of model.vae_run={self.vae_run} (its "
                                 f".hydra/config.yaml model.net): {str(err).splitlines()[0]}") from err
            self.latent_scale.fill_(float(stats["scaling_factor"]))
            log.info(f"VAE from {self.vae_run} (scaling factor {stats['scaling_factor']:.4f}, fitted on {stats['fitted_on']})")
            if self.ema is not None:  # the EMA copy was made before the weights changed
                self.ema.module.load_state_dict(self.denoiser.state_dict())

    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if self.reward_cfg["enabled"]:
            self.fit_reward_weights(dm)
        self.build_latent_cache(dm)

    def fit_reward_weights(self, dm: Any) -> dict[str, Any]:
        """Per baseline group (all samples, or each modality: ``model.reward.baseline``) the mean reward and
        the normaliser that gives the group's weights mean 1, from the training set's rewards.

        With ``baseline: modality`` every modality keeps its share of the training weight, and a sample is
        weighted by how it compares with the other samples of its modality: a modality the selector rates
        low as a whole is improved, not abandoned (the variance-reducing per-prompt-group baseline of
        policy-gradient fine-tuning, as DDPO's per-prompt statistics).

        Raises:
            ValueError: training records without a ``reward`` (e.g. real images instead of rated samples).
        """
        recs = dm.dataset("train").records if dm is not None else []
        rewards = [r.get("reward") for r in recs]
        if not rewards or any(v is None for v in rewards):
            raise ValueError("model.reward.enabled=true but the training images have no reward: train on rated samples "
                             "(data.train_source with reward_column, e.g. generate.py selector_run=<run> output)")
        r = torch.tensor(rewards, dtype=torch.float64)
        g = self._reward_group(torch.tensor([int(rec.get("modality") or 0) for rec in recs]))
        stats = torch.tensor([[float(r.mean()), 1.0]] * (len(self.modalities) + 1), dtype=torch.float64)
        for k in torch.unique(g).tolist():
            sel = g == k
            mean = float(r[sel].mean())
            w = self._raw_weights(r[sel], torch.full_like(r[sel], mean))
            stats[k] = torch.tensor([mean, float(w.mean()) if float(w.mean()) > 0 else 1.0])
        self.reward_stats = stats
        w = self.reward_weights(r, g if self.reward_cfg["baseline"] == "modality" else None).double()
        groups = {("all" if self.reward_cfg["baseline"] == "global" else self.modalities[k]):
                  {"n": int((g == k).sum()), "reward_mean": float(stats[k, 0]), "weight_sum": float(w[g == k].sum())}
                  for k in torch.unique(g).tolist()}
        info = {"n": len(r), "reward_mean": float(r.mean()), "reward_std": float(r.std()) if len(r) > 1 else 0.0,
                "weight_max": float(w.max()), "weight_min": float(w.min()),
                "effective_sample_size": float(w.sum() ** 2 / (w ** 2).sum()) if float(w.sum()) > 0 else 0.0,
                "baseline": self.reward_cfg["baseline"], "groups": groups}
        log.info(f"reward weights ({self.reward_cfg['weighting']}, baseline {self.reward_cfg['baseline']}): {info}")
        self.reward_info = info
        return info

    def _reward_group(self, modality: torch.Tensor) -> torch.Tensor:
        return modality.long() if self.reward_cfg["baseline"] == "modality" else torch.zeros_like(modality).long()

    def _raw_weights(self, reward: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        c = self.reward_cfg
        if c["weighting"] == "threshold":
            return (reward >= float(c["threshold"])).to(reward)
        return torch.exp((reward - mean) / float(c["temperature"]))

    def reward_weights(self, reward: torch.Tensor, modality: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample loss weights of rewards (mean 1 over the training set, or over each modality's
        samples with ``baseline: modality``; clipped at max_weight)."""
        r = torch.as_tensor(reward, dtype=torch.float64)
        if self.reward_cfg["baseline"] == "modality" and modality is None:
            raise ValueError("model.reward.baseline=modality needs each sample's modality")
        g = self._reward_group(torch.as_tensor(modality).cpu() if modality is not None else torch.zeros(len(r)))
        st = self.reward_stats[g]
        w = self._raw_weights(r, st[:, 0]) / st[:, 1]
        return w.clamp(max=float(self.reward_cfg["max_weight"])).float()

    def build_latent_cache(self, dm: Any) -> bool:
        """Compute the VAE posterior of every training image of ``dm`` once (``model.latent_cache``).

        Returns: whether the cache is on.

        Raises:
            ValueError: ``latent_cache=true`` but the data module augments its training images.
        """
        self._posteriors = None
        mode = self.latent_cache_mode
        if mode == "false" or dm is None or not hasattr(dm, "dataloader"):
            return False
        fixed = bool(getattr(dm, "train_images_fixed", False))
        if not fixed:
            if mode == "true":
                raise ValueError("model.latent_cache=true but data.augment changes the training images every epoch; "
                                 "disable the augmentation or set model.latent_cache=auto|false")
            log.info("latent cache off: data.augment changes the training images (the VAE encodes every batch)")
            return False
        loader = dm.dataloader("train", train=False)  # the fixed pixels, in index order
        zc, f = int(self.vae.config.latent_channels), 2 ** (len(self.vae.config.block_out_channels) - 1)
        h, w = (int(v) for v in loader.dataset[0]["image"].shape[-2:])
        mb = 2 * len(loader.dataset) * zc * (h // f) * (w // f) * 4 / 2**20
        if mode == "auto" and mb > self.latent_cache_max_mb:
            log.info(f"latent cache off: {mb:.0f} MB > model.latent_cache_max_mb={self.latent_cache_max_mb:.0f}")
            return False
        means, stds = [], []
        with torch.no_grad():
            for batch in loader:
                dist = self.vae.encode(batch["image"].to(self.latent_scale.device)).latent_dist
                means.append(dist.mean.cpu())
                stds.append(dist.std.cpu())
        self._posteriors = (torch.cat(means), torch.cat(stds))
        log.info(f"latent cache: VAE posteriors of {len(self._posteriors[0])} training images ({mb:.1f} MB)")
        return True

    def on_fit_end(self) -> None:
        self._posteriors = None

    # -- conditions ------------------------------------------------------------------------------
    @property
    def null_modality(self) -> int:
        return len(self.modalities)

    def modality_index(self, name: str | int) -> int:
        """The index of a modality name (or a checked index).

        Raises:
            ValueError: an unknown modality, naming the known ones.
        """
        if isinstance(name, (int, np.integer)) and 0 <= int(name) < len(self.modalities):
            return int(name)
        if str(name) in self.modalities:
            return self.modalities.index(str(name))
        raise ValueError(f"unknown modality {name!r}; this generator knows {self.modalities}")

    def encode_text(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        enc = self.text_encoder
        dev = self.latent_scale.device
        if next(enc.model.parameters()).device != dev:
            enc.model.to(dev)
        return enc(list(texts))

    def conditions(self, texts: Sequence[str], modality: torch.Tensor,
                   drop: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Text states, mask, pooled and modality of a batch; ``drop`` (B bool) replaces an item's
        condition by the null condition (empty text, null modality)."""
        states, mask, pooled = self.encode_text(texts)
        modality = modality.to(states.device).long()
        if drop is not None and bool(drop.any()):
            s0, m0, p0 = self.encode_text([""])
            d = drop.to(states.device)
            states = torch.where(d[:, None, None], s0.expand_as(states), states)
            mask = torch.where(d[:, None], m0.expand_as(mask), mask)
            pooled = torch.where(d[:, None], p0.expand_as(pooled), pooled)
            modality = torch.where(d, torch.full_like(modality, self.null_modality), modality)
        return states, mask, pooled, modality

    # -- latents -----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        dist = self.vae.encode(x).latent_dist
        z = dist.sample(generator) if sample else dist.mean
        return z * self.latent_scale

    @torch.no_grad()
    def posterior(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the VAE posterior of a batch's images (unscaled): from the latent cache for a
        training batch (its ``index`` into the training split), else by encoding."""
        if self._posteriors is not None and self.training and "index" in batch:
            idx = torch.as_tensor(batch["index"]).long().cpu()
            dev = batch["image"].device
            return self._posteriors[0][idx].to(dev), self._posteriors[1][idx].to(dev)
        dist = self.vae.encode(batch["image"]).latent_dist
        return dist.mean, dist.std

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1]."""
        return self.vae.decode(z / self.latent_scale).sample.clamp(-1, 1)

    def net(self, use_ema: bool = True) -> Denoiser:
        return self.ema.module if (use_ema and self.ema is not None) else self.denoiser

    # -- training -----------------------------------------------------------------------------------
    def _loss(self, batch: Mapping[str, Any], generator: torch.Generator | None, timesteps: torch.Tensor | None,
              drop: torch.Tensor | None, net: Denoiser,
              posterior: tuple[torch.Tensor, torch.Tensor] | None = None, weights: torch.Tensor | None = None,
              kl_weight: float = 0.0, parts: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        b = len(batch["image"])
        mean, std = posterior if posterior is not None else self.posterior(batch)
        # a draw from the posterior, as AutoencoderKL's latent_dist.sample
        z = (mean + std * torch.randn(mean.shape, generator=generator).to(mean)) * self.latent_scale
        noise = torch.randn(z.shape, generator=generator).to(z)
        if timesteps is None:
            timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,), generator=generator)
        timesteps = timesteps.to(z.device)
        noisy = self.noise_scheduler.add_noise(z, noise, timesteps)
        states, mask, pooled, modality = self.conditions(batch["text"], torch.as_tensor(batch["modality"]), drop)
        pred = net(noisy, timesteps, states, mask, pooled, modality)
        target = diffusion_target(self.noise_scheduler, z, noise, timesteps)
        loss = self.loss(pred, target, timesteps, self.noise_scheduler, weights=weights)
        if kl_weight > 0:
            # the base generator's prediction on the same noisy latents: the UNet with its adapters off
            with torch.no_grad():
                net.unet.disable_adapters()
                try:
                    base = net(noisy, timesteps, states, mask, pooled, modality)
                finally:
                    net.unet.enable_adapters()
            kl = (pred.float() - base.float()).pow(2).flatten(1).mean(1).mean()
            if parts is not None:
                parts.update(denoising=loss.detach(), kl=kl.detach())
            loss = loss + float(kl_weight) * kl
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        b = len(batch["image"])
        drop = torch.rand(b) < float(self.conditioning["p_uncond"])
        if not self.reward_cfg["enabled"]:
            loss = self._loss(batch, None, None, drop, self.denoiser)
        else:
            if "reward" not in batch:
                raise KeyError("model.reward.enabled=true but the training batch has no 'reward' (rated samples needed)")
            w = self.reward_weights(batch["reward"], torch.as_tensor(batch["modality"])).to(batch["image"].device)
            parts: dict[str, torch.Tensor] = {}
            loss = self._loss(batch, None, None, drop, self.denoiser, weights=w,
                              kl_weight=float(self.reward_cfg["kl_weight"]), parts=parts)
            self.log("train/reward_weight_max", float(w.max()), on_step=False, on_epoch=True, batch_size=b)
            for k, v in parts.items():
                self.log(f"train/{k}", v, on_step=False, on_epoch=True, batch_size=b)
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=b, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.denoiser)

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Denoising loss at fixed timesteps with fixed noise (comparable across epochs), EMA weights."""
        b = len(batch["image"])
        total = 0.0
        posterior = self.posterior(batch)  # encoded once for all the timesteps
        for t in self.val_timesteps:
            g = torch.Generator().manual_seed(1000 * batch_idx + t)
            total += float(self._loss(batch, g, torch.full((b,), t), None, self.net(), posterior))
        self.log("val/gen/loss", total / len(self.val_timesteps), on_epoch=True, batch_size=b, prog_bar=True)
        self.log("val/loss", total / len(self.val_timesteps), on_epoch=True, batch_size=b)

    # -- sampling -----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: Sequence[str], modalities: Sequence[str | int], seeds: Sequence[int],
                 sampler: str | None = None, steps: int | None = None, guidance: float | None = None,
                 guidance_schedule: str | None = None, min_guidance: float | None = None,
                 negative_prompt: str | None = None, batch_size: int = 16, use_ema: bool = True,
                 init_noise: torch.Tensor | None = None) -> torch.Tensor:
        """Images (N×C×H×W in [0, 1]) for ``prompts`` with their modalities and seeds.

        The unconditional branch of guidance is the negative prompt (default ``""``) with the null
        modality. Image ``i``'s initial noise depends on ``seeds[i]`` only (or is ``init_noise[i]``).
        """
        if not (len(prompts) == len(modalities) == len(seeds)):
            raise ValueError(f"generate: {len(prompts)} prompts, {len(modalities)} modalities and {len(seeds)} seeds; "
                             "expected one of each per image")
        s = sampling_settings({**self.sampling, **{k: v for k, v in dict(
            sampler=sampler, steps=steps, guidance=guidance, guidance_schedule=guidance_schedule,
            min_guidance=min_guidance, negative_prompt=negative_prompt).items() if v is not None}})
        self.eval()
        net = self.net(use_ema)
        mods = torch.tensor([self.modality_index(m) for m in modalities])
        zc = int(self.vae.config.latent_channels)
        hw = int(self.denoiser.unet.config.sample_size)
        out = []
        for i in range(0, len(prompts), batch_size):
            sl = slice(i, i + batch_size)
            texts, mod = list(prompts[sl]), mods[sl]
            b = len(texts)
            noise = (init_noise[sl] if init_noise is not None else
                     torch.stack([torch.randn((zc, hw, hw), generator=torch.Generator().manual_seed(int(sd)))
                                  for sd in seeds[sl]]))
            states, mask, pooled, mod = self.conditions(texts, mod)
            if s["guidance"] != 1.0:
                us, um, up = self.encode_text([s["negative_prompt"]] * b)
                um_mod = torch.full_like(mod, self.null_modality)
                states2, mask2 = torch.cat([us, states]), torch.cat([um, mask])
                pooled2, mod2 = torch.cat([up, pooled]), torch.cat([um_mod, mod])

            def denoise(x: torch.Tensor, t: torch.Tensor, guided: bool) -> torch.Tensor:
                tt = torch.full((len(x),), int(t), device=x.device)
                if guided:
                    return net(x, tt, states2, mask2, pooled2, mod2)
                return net(x, tt, states, mask, pooled, mod)

            gen = torch.Generator().manual_seed(int(seeds[i]))
            sched = sampling_scheduler(self.noise_scheduler, s["sampler"])
            z = sample_latents(denoise, sched, tuple(noise.shape), s["steps"], gen, s["guidance"],
                               s["guidance_schedule"], s["min_guidance"], init_noise=noise,
                               device=self.latent_scale.device)
            out.append(((self.decode_latents(z) + 1) / 2).cpu())
        return torch.cat(out) if out else torch.empty(0)

    def sampling_record(self, **overrides: Any) -> dict[str, Any]:
        """The sampling settings an image was made with (for the CSV next to generated images)."""
        return sampling_settings({**self.sampling, **{k: v for k, v in overrides.items() if v is not None}})

    def lora_weights(self) -> dict[str, torch.Tensor]:
        """The LoRA weights alone (``model.lora.enabled``), for ``save_lora``."""
        if not self.lora_cfg["enabled"]:
            raise ValueError("this generator has no LoRA adapters (model.lora.enabled=false)")
        return lora_state_dict(self.net().unet)

    # -- the contract ----------------------------------------------------------------------------
    def post_fit(self, datamodule: Any, run_dir: Path, evaluation: Any = None) -> dict[str, Any] | None:
        """Fit the judge and the alignment model (or reuse another run's); a LoRA run also writes its
        adapters alone to ``<run>/lora/``."""
        from medtrust.evaluation.generation import fit_evaluators

        if self.lora_cfg["enabled"] and not (Path(run_dir) / "lora" / "adapter.safetensors").exists():
            from medtrust.generation.lora import save_lora

            save_lora(self, Path(run_dir) / "lora", run_dir)
        return fit_evaluators(self, datamodule, Path(run_dir), evaluation)

    @classmethod
    def load_post_fit(cls, run_dir: Path) -> dict[str, Any] | None:
        from medtrust.evaluation.generation import load_evaluators

        return load_evaluators(Path(run_dir))

    def evaluate_split(self, datamodule: Any, split: str, out_dir: Path, evaluation: Any = None,
                       extra: Mapping[str, Any] | None = None, fitted: Mapping[str, Any] | None = None) -> EvalResult:
        from medtrust.evaluation.generation import evaluate_generator

        return evaluate_generator(self, datamodule, split, Path(out_dir), evaluation, extra, fitted)

    @classmethod
    def report_sections(cls, run_dir: Path, metrics: Mapping[str, Mapping[str, Any]]) -> list[ReportSection]:
        from medtrust.report.generation import generation_sections

        return generation_sections(Path(run_dir), metrics)

    @classmethod
    def trust_summary(cls, run_dir: Path, metrics: Mapping[str, Mapping[str, Any]]) -> list[TrustLine]:
        from medtrust.report.generation import generation_trust_lines

        return generation_trust_lines(Path(run_dir), metrics)

    def fix_xai_target(self, images: torch.Tensor, spec: Mapping[str, Any], masks: torch.Tensor | None,
                       labels: torch.Tensor | None) -> None:
        return None

    def explain_target(self, output: torch.Tensor, fixed: torch.Tensor | None, kind: str) -> torch.Tensor:
        raise ValueError("generation runs are explained through their samples (evaluate.py), not attribution maps")

    def explain_view(self, images: torch.Tensor, labels: torch.Tensor | None) -> dict[str, Any]:
        with torch.no_grad():
            z = self.encode_images(images, sample=False)
            err = (self.decode_latents(z) - images).abs().mean(1)
        return {"pred": err.cpu().numpy(), "captions": [f"VAE L1 {float(e):.3f}" for e in err.flatten(1).mean(1)],
                "pixel_prob": None}

    @classmethod
    def compare(cls, runs: Sequence[RunModel], datamodule: Any, split: str, out_dir: Path,
                evaluation: Any = None, n_show: int = 6) -> list[dict[str, Any]]:
        from medtrust.evaluation.generation import compare_generators

        return compare_generators(runs, datamodule, split, Path(out_dir), evaluation)
