"""Image classification with uncertainty (Trustworthy Medical Vision): timm backbone + dropout
head, MC dropout, deep ensembles, temperature scaling fitted on validation."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn
from torchmetrics import CatMetric
from torchmetrics.classification import BinaryAUROC, MulticlassAUROC

from medtrust.tasks.base import EvalResult, ReportSection, RunModel, TaskBase, TrustLine, load_init_weights

MC_SCOPES = ("head", "all")


class ClassificationTask(TaskBase):
    """LightningModule for image classification with uncertainty.

    Logs ``train/loss``, ``val/loss``, ``val/cls/{auroc,accuracy,f1,pr_auc,ece_top_label,...}``.
    ``validation_step`` returns, for the calibration callback, ``{"confidence", "correct"}`` (top-label,
    any number of classes) and, for two classes, ``{"prob", "target"}`` (positive-class probability).

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

    task_name: ClassVar[str] = "classification"
    metric_group: ClassVar[str] = "cls"
    evaluation_config: ClassVar[str] = "classification"
    xai_target_kinds: ClassVar[tuple[str, ...]] = ("class_logit", "class_prob")

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
        conf, pred = prob.max(-1)
        self.log(f"{stage}/cls/accuracy", (pred == y).float().mean(), on_epoch=True, batch_size=len(y))
        out = {"confidence": conf.detach(), "correct": (pred == y).float()}
        if self.num_classes == 2:
            out.update({"prob": prob[:, 1].detach(), "target": y.float()})
        return out

    def on_validation_epoch_end(self) -> None:
        from medtrust.metrics.classification import compute_classification_metrics

        self.log("val/cls/auroc", self.val_auroc.compute(), prog_bar=True)
        self.val_auroc.reset()
        if self.val_labels.update_count:
            probs = self.val_probs.compute().reshape(-1, self.num_classes)
            m = compute_classification_metrics(probs.cpu(), self.val_labels.compute().long().cpu())
            for k in ("f1", "pr_auc", "ece_top_label", "ece_top_label_adaptive", "ece_positive", "brier", "nll", "aurc"):
                if k not in m:
                    continue
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

    # -- the task contract ------------------------------------------------------------------
    def fix_xai_target(self, images: torch.Tensor, spec: Mapping[str, Any], masks: torch.Tensor | None,
                       labels: torch.Tensor | None) -> torch.Tensor:
        """The explained class per image: ``spec["class"]`` = ``pred`` (predicted on the
        unperturbed image), ``label`` or a class index. Returns B integers."""
        which = spec.get("class", "pred")
        if which == "label":
            if labels is None:
                raise ValueError("xai.target.class=label but the images have no labels")
            return labels.long()
        if which == "pred":
            with torch.no_grad():
                return self(images).argmax(-1)
        if not (isinstance(which, int) and not isinstance(which, bool) and 0 <= which < self.num_classes):
            raise ValueError(f"xai.target.class must be pred, label or a class index in [0, {self.num_classes}), "
                             f"got {which!r}")
        return torch.full((images.shape[0],), which, dtype=torch.long)

    def explain_target(self, output: torch.Tensor, fixed: torch.Tensor | int | None = None,
                       kind: str = "class_logit") -> torch.Tensor:
        """Logit (``class_logit``) or softmax probability (``class_prob``) of the fixed class per
        image (the predicted class when ``fixed`` is None). Returns: B."""
        if kind == "class_prob":
            output = torch.softmax(output, -1)
        if fixed is None:
            fixed = output.argmax(-1)
        idx = torch.as_tensor(fixed, device=output.device).long().expand(output.shape[0])
        return output.gather(1, idx[:, None])[:, 0]

    def explain_outcome(self, images: torch.Tensor, fixed: torch.Tensor | None, masks: torch.Tensor | None,
                        labels: torch.Tensor | None, evaluation: Any = None) -> dict[str, Any] | None:
        """Uncertainty = predictive entropy of the MC-dropout (or ensemble) distribution; correct =
        the predicted class equals the label."""
        from medtrust.metrics.classification import predictive_uncertainty

        if labels is None:
            return None
        with torch.no_grad():
            out = self.predict_step({"image": images})
        logits = out.get("mc_logits", out["member_logits"])
        unc = predictive_uncertainty(torch.softmax(logits.double(), -1))
        pred = unc["mean"].argmax(-1).cpu()
        return {"uncertainty": unc["entropy"].float().cpu().numpy(), "correct": (pred == labels.cpu()).numpy()}

    def explain_view(self, images: torch.Tensor, labels: torch.Tensor | None) -> dict[str, Any]:
        """The grid's prediction panel is the predicted class's probability everywhere; captions name
        the class (binary: the positive-class probability)."""
        with torch.no_grad():
            prob = torch.softmax(self(images), -1).cpu()
        conf, pred = prob.max(-1)
        shown = prob[:, 1] if self.num_classes == 2 else conf
        caps = [(f"p(1)={prob[i, 1]:.2f}" if self.num_classes == 2 else f"class {int(pred[i])} p={conf[i]:.2f}")
                + (f" y={int(labels[i])}" if labels is not None else "") for i in range(len(prob))]
        h, w = images.shape[-2:]
        return {"pred": shown[:, None, None].expand(-1, h, w).numpy(), "captions": caps, "pixel_prob": None}

    def check_data(self, datamodule: Any, evaluation: Any = None) -> None:
        """Before training: val and the calibration split each hold two classes (else refused, naming the split)."""
        from medtrust.evaluation.classification import check_training_splits

        check_training_splits(datamodule, evaluation)

    def post_fit(self, datamodule: Any, run_dir: Path, evaluation: Any = None) -> dict[str, Any]:
        """Fit temperatures and the trust-quadrant confidence threshold on the calibration split
        (``cal``, carved from the training patients; val when there is none); ``calibration.json``."""
        from medtrust.evaluation.classification import fit_calibration

        return fit_calibration(self, datamodule, run_dir, evaluation)

    @classmethod
    def load_post_fit(cls, run_dir: Path) -> dict[str, Any] | None:
        from medtrust.evaluation.classification import load_calibration

        return load_calibration(run_dir)

    def evaluate_split(self, datamodule: Any, split: str, out_dir: Path, evaluation: Any = None,
                       extra: Mapping[str, Any] | None = None, fitted: Mapping[str, Any] | None = None) -> EvalResult:
        from medtrust.evaluation.classification import evaluate_classification

        return evaluate_classification(self, datamodule, split, out_dir, evaluation, extra, fitted)

    def score_ood(self, datamodule: Any, split: str, sets: Sequence[str], out_dir: Path, evaluation: Any = None,
                  fitted: Mapping[str, Any] | None = None) -> dict[str, Any]:
        from medtrust.evaluation.config import evaluation_config
        from medtrust.evaluation.ood import score_sets

        return score_sets(self, datamodule, split, sets, out_dir, evaluation_config("classification", evaluation), fitted)

    def evaluate_shift(self, datamodule: Any, split: str, out_dir: Path, evaluation: Any = None,
                       fitted: Mapping[str, Any] | None = None, spec: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The corruption benchmark (``spec["benchmark"] == "corruptions"``) and the prevalence shift
        (``spec["prevalence"]``) of ``split``: ``metrics/shift.json`` and its tables and figures."""
        from medtrust.evaluation.config import evaluation_config
        from medtrust.evaluation.shift import corruption_benchmark, prevalence_shift
        from medtrust.utils.io import read_json, write_csv, write_json

        c = evaluation_config("classification", evaluation)
        spec = dict(spec or {})
        out: dict[str, Any] = {}
        if spec.get("benchmark") == "corruptions":
            out = corruption_benchmark(self, datamodule, split, out_dir, c, fitted, spec)
        elif spec.get("benchmark"):
            raise ValueError(f"shift.benchmark must be corruptions or null, got {spec['benchmark']!r}")
        if spec.get("prevalence"):
            import pandas as pd

            rows = prevalence_shift(self, datamodule, split, c, fitted, list(spec["prevalence"]), int(spec.get("seed", 0)))
            write_csv(Path(out_dir) / "metrics" / "shift_prevalence.csv", pd.DataFrame(rows))
            path = Path(out_dir) / "metrics" / "shift.json"
            out = {**(read_json(path) if path.is_file() else {}), "prevalence": rows}
            write_json(path, out)
        return out

    @classmethod
    def report_sections(cls, run_dir: Path, metrics: Mapping[str, Mapping[str, Any]]) -> list[ReportSection]:
        from medtrust.report.classification import report_sections

        return report_sections(run_dir, metrics)

    @classmethod
    def trust_summary(cls, run_dir: Path, metrics: Mapping[str, Mapping[str, Any]]) -> list[TrustLine]:
        from medtrust.report.classification import trust_summary

        return trust_summary(run_dir, metrics)

    @classmethod
    def compare(cls, runs: Sequence[RunModel], datamodule: Any, split: str, out_dir: Path,
                evaluation: Any = None, n_show: int = 6) -> list[dict[str, Any]]:
        from medtrust.evaluation.classification import compare_classifiers

        return compare_classifiers(runs, datamodule, split, out_dir, evaluation)

    @classmethod
    def ensemble_of(cls, tasks: Sequence[Any]) -> ClassificationTask:
        """A deep ensemble of classifier runs: the first task's module with every run's network as a
        member (its own MC dropout off: the members are the samples)."""
        from medtrust.nets.classifier import RunEnsemble

        if not all(isinstance(t, ClassificationTask) for t in tasks):
            raise ValueError("ensemble_runs must all be classification runs")
        if len({t.num_classes for t in tasks}) > 1:
            raise ValueError(f"ensemble_runs differ in their number of classes: {[t.num_classes for t in tasks]}")
        head = tasks[0]
        head.net = RunEnsemble([t.net for t in tasks])
        head.mc_samples = 0
        return head
