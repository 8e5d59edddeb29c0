"""A diffusers ``DiffusionPipeline`` of a medtrust generator: ``save_pretrained`` writes a folder
that :class:`MedtrustLatentDiffusionPipeline` loads offline with ``from_pretrained(folder)`` and
samples from, without medtrust's run folders or configs.

The folder holds the UNet, the autoencoder (its ``scaling_factor`` in its config), the condition
encoder (modality fusion and context token), the text encoder and tokenizer, and the scheduler, as
safetensors and JSON only. Loading refuses a ``model_index.json`` that names any class other than
these (a pipeline folder from elsewhere must not make diffusers import arbitrary code).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput

from medtrust.generation.sampling import sample_latents, sampling_scheduler, sampling_settings
from medtrust.nets.diffusion import ConditionEncoder, encode_prompts

# What a medtrust pipeline folder may name in model_index.json: component -> allowed (library, class) pairs.
ALLOWED_COMPONENTS: dict[str, set[tuple[str, str]]] = {
    "unet": {("diffusers", "UNet2DConditionModel")},
    "vae": {("diffusers", "AutoencoderKL")},
    "condition_encoder": {("medtrust.nets.diffusion", "ConditionEncoder")},
    "scheduler": {("diffusers", c) for c in ("DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler")},
    "text_encoder": {("transformers", c) for c in ("BertModel", "RobertaModel", "DistilBertModel", "XLMRobertaModel",
                                                   "MPNetModel", "ElectraModel")},
    "tokenizer": {("transformers", c) for c in ("BertTokenizer", "BertTokenizerFast", "RobertaTokenizer",
                                                "RobertaTokenizerFast", "DistilBertTokenizer", "DistilBertTokenizerFast",
                                                "XLMRobertaTokenizer", "XLMRobertaTokenizerFast", "MPNetTokenizer",
                                                "MPNetTokenizerFast", "ElectraTokenizer", "ElectraTokenizerFast",
                                                "TokenizersBackend", "PreTrainedTokenizerFast")},
}


class PipelineFolderError(ValueError):
    """A pipeline folder that is missing parts or names classes outside :data:`ALLOWED_COMPONENTS`."""


def check_pipeline_folder(folder: str | Path) -> dict[str, Any]:
    """Read and check ``model_index.json`` of a pipeline folder.

    Raises:
        PipelineFolderError: the file is missing, a component is missing or names a class that is
            not allowed (naming the component and the class).
    """
    p = Path(folder) / "model_index.json"
    if not p.is_file():
        raise PipelineFolderError(f"{folder}: no model_index.json (expected a folder written by save_pretrained)")
    index = json.loads(p.read_text())
    for name, allowed in ALLOWED_COMPONENTS.items():
        entry = index.get(name)
        if not isinstance(entry, list) or len(entry) != 2 or tuple(entry) not in allowed:
            raise PipelineFolderError(f"{p}: component {name!r} is {entry!r}; expected one of {sorted(allowed)}")
    extra = [k for k in index if not k.startswith("_") and k not in ALLOWED_COMPONENTS]
    if extra:
        raise PipelineFolderError(f"{p}: unexpected components {extra}; a medtrust pipeline has {sorted(ALLOWED_COMPONENTS)}")
    return index


class MedtrustLatentDiffusionPipeline(DiffusionPipeline):
    """Text + modality -> images, as the generator run that exported it samples them."""

    model_cpu_offload_seq = "text_encoder->condition_encoder->unet->vae"

    def __init__(self, unet: Any, vae: Any, condition_encoder: ConditionEncoder, scheduler: Any, text_encoder: Any,
                 tokenizer: Any) -> None:
        super().__init__()
        self.register_modules(unet=unet, vae=vae, condition_encoder=condition_encoder, scheduler=scheduler,
                              text_encoder=text_encoder, tokenizer=tokenizer)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> MedtrustLatentDiffusionPipeline:
        """Load from a local folder only (checked first; safetensors only).

        Raises:
            PipelineFolderError: see :func:`check_pipeline_folder`.
        """
        folder = Path(str(pretrained_model_name_or_path)).expanduser()
        if not folder.is_dir():
            raise PipelineFolderError(f"{folder}: not a folder (a medtrust pipeline loads from a local folder only)")
        check_pipeline_folder(folder)
        kwargs.setdefault("use_safetensors", True)
        kwargs.setdefault("local_files_only", True)
        return super().from_pretrained(str(folder), **kwargs)

    @property
    def modalities(self) -> list[str]:
        return list(self.condition_encoder.config.modalities)

    def _modality(self, m: str | int) -> int:
        if isinstance(m, int) and 0 <= m < len(self.modalities):
            return m
        if str(m) in self.modalities:
            return self.modalities.index(str(m))
        raise ValueError(f"unknown modality {m!r}; this pipeline knows {self.modalities}")

    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str], modality: str | int | Sequence[str | int],
                 num_images_per_prompt: int = 1, seed: int | Sequence[int] = 0, num_inference_steps: int = 50,
                 guidance_scale: float = 3.0, guidance_schedule: str = "constant", min_guidance: float = 1.0,
                 negative_prompt: str = "", sampler: str = "ddim", max_length: int = 48,
                 output_type: str = "pil") -> ImagePipelineOutput:
        """Generate ``num_images_per_prompt`` images per prompt.

        Args:
            prompt, modality: one or one per prompt.
            seed: the first image's seed (image ``i`` uses ``seed + i``) or one seed per image.
            sampler: ``ddim``/``dpmsolver++``/``ddpm``, built from the saved training scheduler's config.
            output_type: ``pil``, ``np`` (N×H×W×C in [0, 1]) or ``pt`` (N×C×H×W in [0, 1]).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        mods = [modality] * len(prompts) if isinstance(modality, (str, int)) else list(modality)
        if len(mods) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(mods)} modalities; expected one or one per prompt")
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        mods_t = torch.tensor([self._modality(m) for m in mods for _ in range(num_images_per_prompt)])
        seeds = list(seed) if isinstance(seed, Sequence) else [int(seed) + i for i in range(len(prompts))]
        settings = sampling_settings({"steps": num_inference_steps, "guidance": guidance_scale,
                                      "guidance_schedule": guidance_schedule, "min_guidance": min_guidance,
                                      "sampler": sampler})
        sched = sampling_scheduler(self.scheduler, settings["sampler"])
        dev = self.unet.device
        ml = min(int(max_length), int(getattr(self.text_encoder.config, "max_position_embeddings", max_length)))
        states, mask, pooled = encode_prompts(self.tokenizer, self.text_encoder, prompts, ml)
        n = len(prompts)
        c, hw = int(self.unet.config.in_channels), int(self.unet.config.sample_size)
        noise = torch.stack([torch.randn((c, hw, hw), generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        if settings["guidance"] != 1.0:
            us, um, up = encode_prompts(self.tokenizer, self.text_encoder, [negative_prompt] * n, ml)
            null = torch.full_like(mods_t, self.condition_encoder.null_modality)
            cond2 = self.condition_encoder(torch.cat([us, states]), torch.cat([um, mask]), torch.cat([up, pooled]),
                                           torch.cat([null, mods_t]).to(dev))
        cond = self.condition_encoder(states, mask, pooled, mods_t.to(dev))

        def denoise(x: torch.Tensor, t: torch.Tensor, guided: bool) -> torch.Tensor:
            tt = torch.full((len(x),), int(t), device=x.device)
            return self.unet(x, tt, **(cond2 if guided else cond)).sample

        z = sample_latents(denoise, sched, tuple(noise.shape), settings["steps"], torch.Generator().manual_seed(seeds[0]),
                           settings["guidance"], settings["guidance_schedule"], settings["min_guidance"],
                           init_noise=noise, device=dev)
        img = ((self.vae.decode(z / float(self.vae.config.scaling_factor)).sample.clamp(-1, 1) + 1) / 2).cpu()
        if output_type == "pt":
            return ImagePipelineOutput(images=img)
        arr = img.permute(0, 2, 3, 1).numpy()
        return ImagePipelineOutput(images=arr if output_type == "np" else self.numpy_to_pil(arr))


def export_pipeline(task: Any, folder: str | Path) -> Path:
    """Write ``task`` (a GenerationTask, with its EMA weights when it has them) as a pipeline folder.

    Raises:
        FileExistsError: ``folder`` exists and is not empty (nothing is overwritten).
    """
    import copy

    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} exists and is not empty; pipelines are never written over")
    net = task.net()
    unet = copy.deepcopy(net.unet)
    if getattr(task, "lora_cfg", {}).get("enabled"):
        unet = _merged_unet(unet)
    vae = copy.deepcopy(task.vae)
    vae.register_to_config(scaling_factor=float(task.latent_scale))
    enc = task.text_encoder
    pipe = MedtrustLatentDiffusionPipeline(unet=unet, vae=vae, condition_encoder=copy.deepcopy(net.cond),
                                           scheduler=copy.deepcopy(task.noise_scheduler), text_encoder=enc.model,
                                           tokenizer=enc.tokenizer)
    tmp = folder.with_name(folder.name + ".partial")
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    tmp.rename(folder) if not folder.exists() else (folder.rmdir(), tmp.rename(folder))
    return folder


def _merged_unet(unet: Any) -> Any:
    """A plain UNet2DConditionModel with the LoRA adapters merged into its weights."""
    from diffusers import UNet2DConditionModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in unet.modules():
        if isinstance(m, BaseTunerLayer):
            m.merge()
    merged = UNet2DConditionModel.from_config(unet.config)
    sd = {}
    for k, v in unet.state_dict().items():
        if "lora_" in k:
            continue
        sd[k.replace(".base_layer", "")] = v
    merged.load_state_dict(sd, strict=True)
    return merged
