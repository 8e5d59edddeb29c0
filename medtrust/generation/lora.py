"""LoRA weights on their own: saved after a LoRA run (``<run>/lora/``), applied to a base generator run
(``generate.py run_dir=<base> lora=<folder>``).

The folder holds ``adapter.safetensors`` (the EMA LoRA weights, as peft names them, and, when the run
trained it, the condition encoder: modality embedding, fusion and context-token layers) and
``lora.json``: rank, alpha, the targeted module names with their shapes, the base UNet's config and a
sha256 of its weights (its *fingerprint*), the modalities and the run it came from. safetensors holds
tensors only, so loading a folder from elsewhere runs no code.

Applying checks, before any weight is touched, that the base is the UNet the adapters were trained
on: the same UNet config, every target module present with the same shape, the same modalities, and
the same fingerprint (other weights of the same shape would make the adapters meaningless; override
with ``allow_other_base``). Each mismatch stops with a message naming it.

QLoRA (``model.lora.quantize: nf4 | fp4``) quantises the frozen UNet's linear layers to 4 bit with
bitsandbytes before the adapters are added; it needs a CUDA GPU (:func:`check_quantize`).
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from medtrust.utils.io import atomic_write_bytes, read_json, write_json
from medtrust.utils.logging import get_logger

log = get_logger(__name__)

WEIGHTS = "adapter.safetensors"
INFO = "lora.json"
QUANTIZE = ("nf4", "fp4")
# UNet config keys that decide every module's shape
SHAPE_KEYS = ("sample_size", "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
              "layers_per_block", "cross_attention_dim", "attention_head_dim", "norm_num_groups", "class_embed_type",
              "projection_class_embeddings_input_dim")


class LoraMismatchError(ValueError):
    """LoRA weights that do not belong to this base generator (other UNet, targets or weights)."""


def check_quantize(quantize: str | None) -> str | None:
    """Validate ``model.lora.quantize`` (QLoRA) on this machine.

    Raises:
        ValueError: an unknown value; or 4-bit asked for without a CUDA GPU or without bitsandbytes.
    """
    if quantize in (None, "", "none", False):
        return None
    q = str(quantize)
    if q not in QUANTIZE:
        raise ValueError(f"model.lora.quantize={q!r}; expected null (plain LoRA) or one of {QUANTIZE} (QLoRA, 4 bit)")
    if not torch.cuda.is_available():
        raise ValueError(f"model.lora.quantize={q} (QLoRA) quantises the UNet to 4 bit with bitsandbytes, which needs "
                         "a CUDA GPU; this machine has none (torch.cuda.is_available() is False). Use "
                         "model.lora.quantize=null for plain LoRA on the CPU, or run on a GPU with trainer=gpu")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ValueError(f"model.lora.quantize={q} (QLoRA) needs bitsandbytes: pip install bitsandbytes") from err
    return q


def quantize_linear_layers(module: nn.Module, quant_type: str, compute_dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace every ``nn.Linear`` of the (frozen) ``module`` by a bitsandbytes ``Linear4bit`` holding the
    same weights (quantised when the module moves to the GPU). Returns the number replaced.

    Only reached after :func:`check_quantize` (a CUDA GPU and bitsandbytes). Not run on this CPU-only
    project machine: the path is what QLoRA (Dettmers et al. 2023) prescribes, peft adds LoRA to
    ``Linear4bit`` layers.
    """
    import bitsandbytes as bnb

    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute_dtype, quant_type=quant_type)
            q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type=quant_type)
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
            setattr(module, name, q)
            count += 1
        else:
            count += quantize_linear_layers(child, quant_type, compute_dtype)
    return count


def _clean(name: str) -> str:
    return name.replace(".base_layer", "")


def base_fingerprint(unet: nn.Module) -> str:
    """sha256 of a UNet's own weights (LoRA layers left out, peft's ``base_layer`` names undone)."""
    h = hashlib.sha256()
    for name, t in sorted(((n, t) for n, t in unet.state_dict().items() if "lora_" not in n),
                          key=lambda kv: _clean(kv[0])):
        h.update(_clean(name).encode())
        h.update(t.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def unet_shape_config(unet: nn.Module) -> dict[str, Any]:
    cfg = dict(unet.config)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items() if k in SHAPE_KEYS}


def targeted_modules(unet: nn.Module) -> dict[str, list[int]]:
    """Module name -> weight shape of every module that carries a LoRA adapter."""
    out = {}
    for name, mod in unet.named_modules():
        if hasattr(mod, "lora_A") and hasattr(mod, "base_layer"):
            w = getattr(mod.base_layer, "weight", None)
            out[name] = list(w.shape) if w is not None else []
    return out


def save_lora(task: Any, folder: str | Path, run_dir: str | Path | None = None) -> Path:
    """Write the LoRA weights of a LoRA generator run (its EMA weights: those it samples with).

    Raises:
        ValueError: the task has no adapters; FileExistsError: ``folder`` already holds LoRA weights.
    """
    from safetensors.torch import save

    from medtrust.nets.diffusion import lora_state_dict

    if not task.lora_cfg.get("enabled"):
        raise ValueError("this generator has no LoRA adapters (model.lora.enabled=false)")
    folder = Path(folder)
    if (folder / WEIGHTS).exists():
        raise FileExistsError(f"{folder / WEIGHTS} exists; LoRA weights are never overwritten")
    net = task.net()
    tensors = {f"unet.{k}": v for k, v in lora_state_dict(net.unet).items()}
    cond_trained = bool(task.lora_cfg.get("train_condition_encoder", True))
    if cond_trained:
        tensors.update({f"cond.{k}": v.detach().cpu().contiguous() for k, v in net.cond.state_dict().items()})
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / WEIGHTS, save(tensors))
    lo = task.lora_cfg
    info = {"rank": int(lo["rank"]), "alpha": float(lo["alpha"] if lo.get("alpha") is not None else lo["rank"]),
            "dropout": float(lo.get("dropout") or 0.0), "target_modules": lo.get("target_modules"),
            "targeted": targeted_modules(net.unet), "condition_encoder": cond_trained,
            # the base weights are frozen (and the EMA keeps frozen weights bit-identical), so they are the
            # weights the run started from; a QLoRA run hashed them before quantising them
            "base": {"unet_config": unet_shape_config(net.unet),
                     "fingerprint": getattr(task, "base_fingerprint", None) or base_fingerprint(net.unet),
                     "init_from": task.hparams.get("init_from")},
            "modalities": list(task.modalities), "run_dir": str(run_dir) if run_dir else None,
            "n_tensors": len(tensors), "bytes": int((folder / WEIGHTS).stat().st_size),
            "trainable_share_of_unet": (task.lora_params or {}).get("share")}
    write_json(folder / INFO, info)
    log.info(f"LoRA weights: {folder} ({info['bytes'] / 2**20:.2f} MB)")
    return folder


def read_lora(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``lora.json`` and the tensors of a LoRA folder (safetensors: no code is run).

    Raises:
        FileNotFoundError: not a LoRA folder (naming what is missing).
    """
    from safetensors.torch import load_file

    folder = Path(str(folder)).expanduser()
    missing = [n for n in (INFO, WEIGHTS) if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"lora={folder}: not a LoRA folder (missing {', '.join(missing)}; expected the "
                                "lora/ folder a model.lora.enabled=true run writes)")
    try:
        tensors = load_file(str(folder / WEIGHTS))
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"lora={folder}: {WEIGHTS} is not a readable safetensors file ({err})") from err
    return read_json(folder / INFO), tensors


def apply_lora(task: Any, folder: str | Path, allow_other_base: bool = False) -> dict[str, Any]:
    """Add the adapters of ``folder`` to a base generator task (to the weights it samples with).

    Raises:
        LoraMismatchError: other UNet config, missing target modules or other shapes, other modalities,
            other base weights (unless ``allow_other_base``), or LoRA weights that do not fit.
    """
    from medtrust.nets.diffusion import add_lora, load_lora_state_dict

    info, tensors = read_lora(folder)
    if task.lora_cfg.get("enabled"):
        raise LoraMismatchError(f"lora={folder}: the run already has LoRA adapters; apply LoRA weights to its base run "
                                f"({task.hparams.get('init_from')})")
    net = task.net()
    where = f"lora={folder}"
    mine, theirs = unet_shape_config(net.unet), dict(info["base"]["unet_config"])
    diff = {k: (theirs.get(k), mine.get(k)) for k in set(mine) | set(theirs) if theirs.get(k) != mine.get(k)}
    if diff:
        raise LoraMismatchError(f"{where}: LoRA weights trained for a different base UNet: config differs in "
                                + "; ".join(f"{k} (LoRA base {a}, this run {b})" for k, (a, b) in sorted(diff.items())))
    modules = dict(net.unet.named_modules())
    for name, shape in info["targeted"].items():
        if name not in modules:
            raise LoraMismatchError(f"{where}: LoRA weights trained for a different base UNet: target module {name!r} "
                                    "does not exist in this UNet")
        w = getattr(modules[name], "weight", None)
        if w is None or list(w.shape) != list(shape):
            raise LoraMismatchError(f"{where}: LoRA weights trained for a different base UNet: module {name!r} has "
                                    f"shape {list(w.shape) if w is not None else None}, the adapters expect {shape}")
    if list(info["modalities"]) != list(task.modalities):
        raise LoraMismatchError(f"{where}: trained for modalities {info['modalities']}, this run has {task.modalities}")
    fp = base_fingerprint(net.unet)
    if fp != info["base"]["fingerprint"] and not allow_other_base:
        raise LoraMismatchError(f"{where}: LoRA weights trained on other base weights (fingerprint "
                                f"{info['base']['fingerprint'][:12]}, this run {fp[:12]}; trained from "
                                f"{info['base'].get('init_from')}); lora_allow_other_base=true applies them anyway")
    add_lora(net.unet, rank=int(info["rank"]), alpha=float(info["alpha"]), dropout=0.0,
             target_modules=sorted(info["targeted"]))
    unet_state = {k[len("unet."):]: v for k, v in tensors.items() if k.startswith("unet.")}
    try:
        load_lora_state_dict(net.unet, unet_state)
    except (ValueError, RuntimeError) as err:
        raise LoraMismatchError(f"{where}: {err}") from err
    if info.get("condition_encoder"):
        cond = {k[len("cond."):]: v for k, v in tensors.items() if k.startswith("cond.")}
        try:
            net.cond.load_state_dict(cond, strict=True)
        except RuntimeError as err:
            raise LoraMismatchError(f"{where}: its condition encoder does not fit this run's: "
                                    f"{str(err).splitlines()[0]}") from err
    net.eval()
    log.info(f"applied LoRA {folder} (rank {info['rank']}, {len(info['targeted'])} modules) to the base generator")
    return info


def lora_folder_info(folder: str | Path) -> Mapping[str, Any]:
    return read_json(Path(folder) / INFO)
