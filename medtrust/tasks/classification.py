"""Image classification with uncertainty (Trustworthy Medical Vision): timm backbone + dropout
head, MC dropout, deep ensembles, temperature scaling fitted on validation."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torchmetrics import CatMetric
from torchmetrics.classification import BinaryAUROC, MulticlassAUROC

from medtrust.tasks.base import TaskBase, load_init_weights

MC_SCOPES = ("head", "all")


class ClassificationTask(TaskBase):
    """LightningModule for image classification with uncertainty.

    Logs ``train/loss``, ``val/loss``, ``val/cls/{auroc,accuracy}``; ``validation_step`` returns
    ``{"prob", "target"}`` (positive-class probability for binary tasks) for the calibration callback.

    Args:
        net: :class:`~medtrust.nets.classifier.TimmClassifier` or
            :class:`~medtrust.nets.classifier.EnsembleClassifier` (anything with ``member_logits``).
        loss: loss on (logits B×C, labels B); ensemble members are each trained on it.
        optimizer, scheduler, scheduler_interval: as for every task (Hydra partials).
        mc_samples: T stochastic passes for MC dropout at evaluation (0 = off).
        mc_scope: ``head`` (backbone once, dropout head T times, batched) or ``all`` (T full passes
            with every dropout / drop-path module active).
        monitor, monitor_mode: checkpoint / early-stopping metric.
        init_from: checkpoint of another run whose matching weights initialise this model.
        freeze: parameter-name prefixes to freeze (e.g. ``[net.backbone.conv1, net.backbone.layer1]``).
        channels_last: channels-last memory format.
    """

    task_name = "classification"

    def __init__(
        self,
        net: nn.Module,
        loss: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "step",
        mc_samples: int = 20,
        mc_scope: str = "head",
        monitor: str = "val/cls/auroc",
        monitor_mode: str = "max",
        init_from: str | None = None,
        freeze: Sequence[str] | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if mc_scope not in MC_SCOPES:
            raise ValueError(f"model.mc_scope must be one of {MC_SCOPES}, got {mc_scope!r}")
        if mc_samples < 0:
            raise ValueError(f"model.mc_samples must be >= 0, got {mc_samples}")
        if scheduler_interval not in ("step", "epoch") or monitor_mode not in ("max", "min"):
            raise ValueError("model.scheduler_interval must be step|epoch and model.monitor_mode max|min")
        self.save_hyperparameters(ignore=["net", "loss", "optimizer", "scheduler"])
        self.net, self.loss = net, loss
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.scheduler_interval, self.monitor = scheduler_interval, monitor
        self.mc_samples, self.mc_scope, self.channels_last = int(mc_samples), mc_scope, channels_last
        self.num_classes = int(getattr(net, "num_classes", 2))
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.val_auroc = BinaryAUROC() if self.num_classes == 2 else MulticlassAUROC(self.num_classes)
        # every probability/label of the epoch (CatMetric: gathered across processes under DDP) for
        # the full metric set per validation epoch (F1, PR-AUC, ECE equal-width/adaptive, NLL, AURC)
        self.val_probs, self.val_labels = CatMetric(), CatMetric()
        self.init_report = load_init_weights(self, init_from) if init_from else None
        self.frozen = self._freeze(list(freeze or []))

    def _freeze(self, prefixes: list[str]) -> list[str]:
        names = [n for n, _ in self.named_parameters()]
        for p in prefixes:
            if not any(n.startswith(p) for n in names):
                tops = sorted({".".join(n.split(".")[:3]) for n in names})
                raise ValueError(f"model.freeze: no parameter starts with {p!r}; e.g. {tops[:20]}")
        frozen = [n for n, prm in self.named_parameters() if any(n.startswith(p) for p in prefixes)]
        for n, prm in self.named_parameters():
            if n in frozen:
                prm.requires_grad_(False)
        return frozen

    # -- forward passes ----------------------------------------------------------------------
    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits M×B×C (M = 1 for a single network)."""
        return self.net.member_logits(self._prep(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits B×C whose softmax is the (ensemble-)mean probability."""
        m = self.member_logits(x)
        if m.shape[0] == 1:
            return m[0]
        return torch.logsumexp(torch.log_softmax(m, -1), 0) - torch.log(torch.tensor(float(m.shape[0])))

    def _dropout_modules(self, head_only: bool) -> list[nn.Module]:
        nets = list(getattr(self.net, "members", [self.net]))
        if head_only:
            return [n.dropout for n in nets]
        return [m for m in self.net.modules() if isinstance(m, nn.Dropout) or type(m).__name__ == "DropPath"]

    @torch.no_grad()
    def mc_logits(self, x: torch.Tensor, samples: int | None = None, scope: str | None = None) -> torch.Tensor:
        """MC-dropout logits T×B×C with the network otherwise in eval mode.

        ``scope="head"``: features once, the T×B head inputs in one batched pass (exactly what
        T full passes compute when dropout is only in the head, at about 1/T of the cost).
        ``scope="all"``: T full forward passes with every dropout / drop-path module active.
        For ensembles the T samples are spread over the members' heads (T per member).
        """
        t = int(samples or self.mc_samples)
        scope = scope or self.mc_scope
        x = self._prep(x)
        mods = self._dropout_modules(head_only=scope == "head")
        states = [m.training for m in mods]
        try:
            for m in mods:
                m.train()
            nets = list(getattr(self.net, "members", [self.net]))
            out = []
            for net in nets:
                if scope == "head":
                    f = net.features(x)  # B×F, dropout-free backbone pass
                    out.append(net.head(f.repeat(t, 1)).view(t, x.shape[0], -1))
                else:
                    out.append(torch.stack([net(x) for _ in range(t)]))
            return torch.cat(out)
        finally:
            for m, s in zip(mods, states):
                m.train(s)

    # -- Lightning steps ---------------------------------------------------------------------
    def _labels(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        if "label" not in batch:
            raise KeyError(f"{stage} batch has no 'label'; the classification task needs labelled data "
                           "(data.require_label=true, a label column)")
        return batch["label"].long()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        y = self._labels(batch, "train")
        logits = self.member_logits(batch["image"])  # M×B×C: each member gets its own loss
        loss = self.loss(logits.flatten(0, 1), y.repeat(logits.shape[0]))
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._eval_step(batch, "test")

    def _eval_step(self, batch: dict[str, Any], stage: str) -> dict[str, torch.Tensor]:
        y = self._labels(batch, stage)
        logits = self(batch["image"])
        self.log(f"{stage}/loss", nn.functional.nll_loss(torch.log_softmax(logits, -1), y), on_epoch=True,
                 prog_bar=True, batch_size=len(y))
        prob = torch.softmax(logits, -1)
        self.val_auroc.update(prob[:, 1] if self.num_classes == 2 else prob, y)
        if stage == "val":
            self.val_probs.update(prob.detach().float())
            self.val_labels.update(y)
        self.log(f"{stage}/cls/accuracy", (prob.argmax(-1) == y).float().mean(), on_epoch=True, batch_size=len(y))
        out = {"prob": prob[:, 1], "target": y.float()} if self.num_classes == 2 else {"prob_all": prob}
        return out

    def on_validation_epoch_end(self) -> None:
        from medtrust.metrics.classification import compute_classification_metrics

        self.log("val/cls/auroc", self.val_auroc.compute(), prog_bar=True)
        self.val_auroc.reset()
        if self.val_labels.update_count:
            probs = self.val_probs.compute().reshape(-1, self.num_classes)
            m = compute_classification_metrics(probs.cpu(), self.val_labels.compute().long().cpu())
            for k in ("f1", "pr_auc", "ece", "ece_adaptive", "brier", "nll", "aurc"):
                self.log(f"val/cls/{k}", float(m[k]))
        self.val_probs.reset()
        self.val_labels.reset()

    def on_test_epoch_end(self) -> None:
        self.log("test/cls/auroc", self.val_auroc.compute())
        self.val_auroc.reset()

    def predict_step(self, batch: dict[str, Any], batch_idx: int = 0) -> dict[str, torch.Tensor]:
        """``{"member_logits": M×B×C, "prob": B×C}`` (+ ``"mc_logits"`` T×B×C when ``mc_samples``)."""
        m = self.member_logits(batch["image"])
        out = {"member_logits": m, "prob": torch.softmax(m, -1).mean(0)}
        if self.mc_samples > 0:
            out["mc_logits"] = self.mc_logits(batch["image"])
        return out

    def explain_target(self, logits: torch.Tensor, target_class: torch.Tensor | int | None = None) -> torch.Tensor:
        """Class logit per image (the predicted class by default). Returns: B."""
        if target_class is None:
            target_class = logits.argmax(-1)
        idx = torch.as_tensor(target_class, device=logits.device).expand(logits.shape[0])
        return logits.gather(1, idx[:, None])[:, 0]

    # -- after training / evaluation -----------------------------------------------------------
    def post_fit(self, datamodule: Any, run_dir: Path, cfg: Any = None) -> dict[str, Any]:
        """Fit temperatures and the trust-quadrant confidence threshold on validation; write
        ``calibration.json`` into the run folder."""
        from medtrust.evaluation.classification import fit_calibration

        return fit_calibration(self, datamodule, run_dir, cfg)

    def evaluate_split(self, datamodule: Any, split: str, out_dir: Any, cfg: Any = None,
                       extra: dict[str, Any] | None = None, calibration: dict[str, Any] | None = None) -> dict[str, Any]:
        from medtrust.evaluation.classification import evaluate_classification

        return evaluate_classification(self, datamodule, split, out_dir, cfg, extra, calibration)
