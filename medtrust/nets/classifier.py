"""timm backbone + our own dropout head, and a deep ensemble of such classifiers.

The head is ``nn.Dropout`` -> ``nn.Linear`` on the backbone's pooled features
(``forward_features`` -> ``forward_head(pre_logits=True)``). timm applies its own ``drop_rate``
with functional dropout, which a module scan cannot find or switch on alone; an ``nn.Dropout``
module can, so MC dropout runs the backbone once and only the head T times.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn


class TimmClassifier(nn.Module):
    """Image classifier: any timm backbone by name plus a dropout head.

    Args:
        backbone: timm model name (``resnet18``, ``resnet50``, ``efficientnet_b0``, ...).
        num_classes: output classes (2 for binary tasks: softmax over two logits).
        in_chans: input channels (1 = grayscale; timm adapts the stem, also for pretrained weights).
        pretrained: load pretrained weights: from ``pretrained_file`` if given, else from the local
            Hugging Face / timm cache (no download when ``HF_HUB_OFFLINE=1``).
        pretrained_file: local weights file (``.safetensors``/``.pth``/``.bin``) for the backbone.
        head_dropout: dropout rate of the head (MC dropout samples this layer).
        drop_path_rate: stochastic depth inside the backbone (timm), an optional backbone dropout.

    Raises:
        ValueError: unknown backbone name.
        FileNotFoundError: ``pretrained`` requested but no local weights found (names what is missing).
    """

    def __init__(self, backbone: str = "resnet18", num_classes: int = 2, in_chans: int = 1, pretrained: bool = False,
                 pretrained_file: str | None = None, head_dropout: float = 0.2, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        import timm

        if not timm.is_model(backbone):
            close = timm.list_models(f"*{backbone.split('_')[0]}*")[:10]
            raise ValueError(f"model.net.backbone: unknown timm model {backbone!r} (similar: {close})")
        if not 0 <= head_dropout < 1:
            raise ValueError(f"model.net.head_dropout must be in [0, 1), got {head_dropout}")
        kwargs = dict(num_classes=0, in_chans=in_chans, drop_path_rate=drop_path_rate)
        if pretrained and pretrained_file:
            path = Path(str(pretrained_file)).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"model.net.pretrained_file not found: {path}")
            self.backbone = timm.create_model(backbone, pretrained=True, pretrained_cfg_overlay={"file": str(path)},
                                              **kwargs)
        elif pretrained:
            try:
                self.backbone = timm.create_model(backbone, pretrained=True, **kwargs)
            except Exception as err:  # hub errors differ by version; the point is: not available offline
                offline = os.environ.get("HF_HUB_OFFLINE", "")
                raise FileNotFoundError(
                    f"model.net.pretrained=true but no weights for {backbone!r} were found locally "
                    f"(HF_HUB_OFFLINE={offline or 'unset'}; looked in the Hugging Face cache): set "
                    f"model.net.pretrained_file=<local weights file> or pretrained=false ({type(err).__name__}: {err})"
                ) from err
        else:
            self.backbone = timm.create_model(backbone, pretrained=False, **kwargs)
        self.dropout = nn.Dropout(head_dropout)
        self.classifier = nn.Linear(self.backbone.num_features, num_classes)
        self.num_classes = num_classes

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled pre-logit features B×F."""
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits B×C from features (dropout -> linear)."""
        return self.classifier(self.dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits with an explicit member axis: 1×B×C."""
        return self(x)[None]


class EnsembleClassifier(nn.Module):
    """Deep ensemble (Lakshminarayanan et al., 2017): M independently initialised classifiers
    trained together in one run; predictions are averaged in probability space.

    Args:
        members: M (>= 2).
        seed: member m is initialised with ``torch.manual_seed(seed + m)``.
        **kwargs: :class:`TimmClassifier` arguments shared by all members.
    """

    def __init__(self, members: int = 3, seed: int = 0, **kwargs) -> None:
        super().__init__()
        if members < 2:
            raise ValueError(f"model.net.members must be >= 2 for an ensemble, got {members}")
        state = torch.random.get_rng_state()
        nets = []
        for m in range(members):
            torch.manual_seed(seed + m)
            nets.append(TimmClassifier(**kwargs))
        torch.random.set_rng_state(state)
        self.members = nn.ModuleList(nets)
        self.num_classes = nets[0].num_classes

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits M×B×C."""
        return torch.stack([m(x) for m in self.members])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log of the mean member probability (so softmax of the output is the ensemble mean)."""
        return torch.logsumexp(torch.log_softmax(self.member_logits(x), -1), 0) - torch.log(
            torch.tensor(float(len(self.members))))


class RunEnsemble(nn.Module):
    """Deep ensemble assembled from separately trained classifiers (e.g. M run folders).

    Args:
        nets: trained classifiers with ``member_logits`` (each may itself be an ensemble).

    Raises:
        ValueError: fewer than two networks, or networks with different numbers of classes.
    """

    def __init__(self, nets: list[nn.Module]) -> None:
        super().__init__()
        if len(nets) < 2:
            raise ValueError(f"an ensemble needs at least 2 networks, got {len(nets)}")
        classes = [getattr(n, "num_classes", None) for n in nets]
        if len(set(classes)) != 1:
            raise ValueError(f"ensemble members disagree on the number of classes: {classes}")
        self.members = nn.ModuleList(nets)
        self.num_classes = classes[0]

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.member_logits(x) for m in self.members])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.member_logits(x)
        return torch.logsumexp(torch.log_softmax(m, -1), 0) - torch.log(torch.tensor(float(m.shape[0])))
