"""Binary segmentation task (GlassBox-XAI): Attention U-Net + Dice/Tversky/hybrid losses."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn

from medtrust.metrics.segmentation import SegmentationMetric, compute_confusion, per_image_scores
from medtrust.tasks.base import EvalResult, ReportSection, RunModel, TaskBase, TrustLine, load_init_weights


class SegmentationTask(TaskBase):
    """LightningModule for binary segmentation.

    Logs ``train/loss``, ``val/loss``, ``{val,test}/seg/{dice,iou,precision,recall,accuracy,f1,
    fp_rate,fn_rate}``. ``validation_step``/``test_step`` return ``{"prob", "target"}`` so
    callbacks (calibration, explanations) reuse the forward pass.

    Args:
        net: network mapping B×C×H×W images to B×1×H×W logits.
        loss: loss on (logits, mask).
        optimizer: partial optimizer (``params`` filled in here).
        scheduler: optional partial LR scheduler (its horizon is filled from the trainer).
        scheduler_interval: ``step`` or ``epoch``.
        threshold: probability threshold for the predicted mask.
        monitor: metric used for checkpointing/early stopping (read by the callback configs).
        monitor_mode: ``max`` or ``min``.
        init_from: optional checkpoint whose matching weights initialise the model (fine-tuning).
        channels_last: use the channels-last memory format (faster convolutions on some CPUs).
        tta: test-time flips averaged in ``predict_step`` (evaluation, explanations):
            any of ``hflip``, ``vflip``; with both, the combined flip is added too. Training and
            validation-time checkpoint selection use the plain forward pass.
    """

    task_name: ClassVar[str] = "segmentation"
    metric_group: ClassVar[str] = "seg"
    evaluation_config: ClassVar[str] = "segmentation"
    xai_target_kinds: ClassVar[tuple[str, ...]] = ("region_logit", "region_prob")
    has_pixel_probabilities: ClassVar[bool] = True

    def __init__(
        self,
        net: nn.Module,
        loss: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "step",
        threshold: float = 0.5,
        monitor: str = "val/seg/dice",
        monitor_mode: str = "max",
        init_from: str | None = None,
        channels_last: bool = False,
        tta: list[str] | None = None,
    ) -> None:
        super().__init__()
        if not 0 < threshold < 1:
            raise ValueError(f"model.threshold must be in (0, 1), got {threshold}")
        if scheduler_interval not in ("step", "epoch"):
            raise ValueError(f"model.scheduler_interval must be 'step' or 'epoch', got {scheduler_interval!r}")
        tta = list(tta or [])
        if not set(tta) <= {"hflip", "vflip"}:
            raise ValueError(f"model.tta entries must be hflip/vflip, got {tta}")
        if monitor_mode not in ("max", "min"):
            raise ValueError(f"model.monitor_mode must be 'max' or 'min', got {monitor_mode!r}")
        self.save_hyperparameters(ignore=["net", "loss", "optimizer", "scheduler"])
        self.net, self.loss = net, loss
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.scheduler_interval, self.threshold, self.monitor = scheduler_interval, threshold, monitor
        self.channels_last = channels_last
        # flip dims of each test-time view (identity first); both flips add the combined flip
        dims = [[-1]] * ("hflip" in tta) + [[-2]] * ("vflip" in tta)
        self.tta_views: list[list[int]] = [[], *dims] + ([[-2, -1]] if len(dims) == 2 else [])
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.train_metric = SegmentationMetric(threshold)
        self.val_metric = SegmentationMetric(threshold)
        self.test_metric = SegmentationMetric(threshold)
        self.init_report = load_init_weights(self, init_from) if init_from else None

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Logits B×1×H×W for images B×C×H×W."""
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        return self.net(image)

    def _shared_step(self, batch: dict[str, Any], stage: str) -> dict[str, torch.Tensor]:
        if "mask" not in batch:
            raise KeyError(f"{stage} batch has no 'mask'; the segmentation task needs data with masks (data.require_mask=true)")
        logits = self(batch["image"])
        loss = self.loss(logits, batch["mask"])
        prob = torch.sigmoid(logits)
        bs = batch["image"].shape[0]
        self.log(f"{stage}/loss", loss, on_step=stage == "train", on_epoch=True, prog_bar=stage != "test",
                 batch_size=bs)
        metric = getattr(self, f"{stage}_metric")
        metric.update(prob.detach(), batch["mask"])
        return {"loss": loss, "prob": prob.detach(), "target": batch["mask"]}

    def _log_epoch(self, stage: str) -> None:
        metric = getattr(self, f"{stage}_metric")
        values = metric.compute()
        self.log_dict({f"{stage}/seg/{k}": v.float() for k, v in values.items() if k != "dice"})
        self.log(f"{stage}/seg/dice", values["dice"].float(), prog_bar=True)
        metric.reset()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")["loss"]

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._shared_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._shared_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int = 0) -> dict[str, torch.Tensor]:
        """Returns ``{"logits", "prob", "mask_pred"}`` (B×1×H×W each); with ``tta`` the
        probabilities are the mean over the flipped views (flipped back) and ``logits`` their logit."""
        x = batch["image"]
        if len(self.tta_views) == 1:
            logits = self(x)
            prob = torch.sigmoid(logits)
        else:
            prob = torch.stack([torch.sigmoid(self(x.flip(d) if d else x)).flip(d) if d else torch.sigmoid(self(x))
                                for d in self.tta_views]).mean(0)
            logits = torch.logit(prob, eps=1e-6)
        return {"logits": logits, "prob": prob, "mask_pred": (prob >= self.threshold).float()}

    # -- the task contract ------------------------------------------------------------------
    def fix_xai_target(self, images: torch.Tensor, spec: Mapping[str, Any], masks: torch.Tensor | None,
                       labels: torch.Tensor | None) -> torch.Tensor:
        """The region the target sums over: ``spec["region"]`` = ``pred`` (the prediction on the
        unperturbed image; an empty prediction falls back to the whole image so the target is never
        identically zero) or ``mask`` (the ground truth). Returns B×1×H×W."""
        where = str(spec.get("region", "pred"))
        if where == "mask":
            if masks is None:
                raise ValueError("xai.target.region=mask but the images have no ground-truth masks")
            return masks.float()
        if where != "pred":
            raise ValueError(f"xai.target.region must be pred or mask, got {where!r}")
        with torch.no_grad():
            mask = self.predict_step({"image": images})["mask_pred"].float()
        mask[mask.flatten(1).sum(1) == 0] = 1.0
        return mask

    def explain_target(self, output: torch.Tensor, fixed: torch.Tensor | None, kind: str = "region_prob") -> torch.Tensor:
        """Sum of sigmoid (``region_prob``: the decision) or of logits (``region_logit``: the
        sensitivity GlassBox shows) over the fixed region (default: each input's own prediction).
        Args: output B×1×H×W logits; fixed B×1×H×W or None. Returns: B."""
        out = torch.sigmoid(output) if kind == "region_prob" else output
        region = fixed if fixed is not None else (torch.sigmoid(output) >= self.threshold).float().detach()
        return (out * region).flatten(1).sum(1)

    def explain_outcome(self, images: torch.Tensor, fixed: torch.Tensor | None, masks: torch.Tensor | None,
                        labels: torch.Tensor | None, evaluation: Any = None) -> dict[str, Any] | None:
        """Uncertainty = mean pixel entropy inside the explained region; correct = per-image Dice
        >= ``evaluation.explanation_correct_dice``."""
        if masks is None:
            return None
        from medtrust.evaluation.config import evaluation_config

        c = evaluation_config(self.evaluation_config, evaluation)
        with torch.no_grad():
            p = torch.sigmoid(self(images)).clamp(1e-6, 1 - 1e-6)
        ent = -(p * p.log() + (1 - p) * (1 - p).log())
        pred = (p >= self.threshold).float()
        region = fixed if fixed is not None else pred
        unc = (ent * region).flatten(1).sum(1) / region.flatten(1).sum(1).clamp_min(1)
        dice = per_image_scores(compute_confusion(p, masks.float(), self.threshold))["dice"]
        return {"uncertainty": unc.cpu().numpy(), "correct": (dice >= float(c.explanation_correct_dice)).numpy(),
                "dice": dice.numpy()}

    def explain_view(self, images: torch.Tensor, labels: torch.Tensor | None) -> dict[str, Any]:
        with torch.no_grad():
            prob = torch.sigmoid(self(images))[:, 0].cpu()
        return {"pred": (prob >= self.threshold).float().numpy(), "captions": None, "pixel_prob": prob.numpy()}

    def post_fit(self, datamodule: Any, run_dir: Path, evaluation: Any = None) -> dict[str, Any]:
        """Choose the best-Dice threshold on the calibration split (or val): ``threshold.json``."""
        from medtrust.evaluation.segmentation import fit_threshold

        return fit_threshold(self, datamodule, run_dir, evaluation)

    @classmethod
    def load_post_fit(cls, run_dir: Path) -> dict[str, Any] | None:
        from medtrust.evaluation.segmentation import load_threshold

        return load_threshold(run_dir)

    def evaluate_split(self, datamodule: Any, split: str, out_dir: Path, evaluation: Any = None,
                       extra: Mapping[str, Any] | None = None, fitted: Mapping[str, Any] | None = None) -> EvalResult:
        """Full evaluation of one split into ``out_dir`` (metrics JSON/CSV and figures)."""
        from medtrust.evaluation.segmentation import evaluate_segmentation

        return evaluate_segmentation(self, datamodule, split, out_dir, evaluation, extra, fitted)

    @classmethod
    def report_sections(cls, run_dir: Path, metrics: Mapping[str, Mapping[str, Any]]) -> list[ReportSection]:
        from medtrust.report.segmentation import report_sections

        return report_sections(run_dir, metrics)

    @classmethod
    def trust_summary(cls, run_dir: Path, metrics: Mapping[str, Mapping[str, Any]]) -> list[TrustLine]:
        from medtrust.report.segmentation import trust_summary

        return trust_summary(run_dir, metrics)

    def evaluate_shift(self, datamodule: Any, split: str, out_dir: Path, evaluation: Any = None,
                       fitted: Mapping[str, Any] | None = None, spec: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``shift=preprocessing``: the split with each of the 15 augmentations applied at test time
        (``metrics/shift_preprocessing.csv``, ``metrics/shift.json``)."""
        import pandas as pd

        from medtrust.evaluation.segmentation import preprocessing_table
        from medtrust.utils.io import write_csv, write_json

        spec = dict(spec or {})
        if spec.get("benchmark") != "preprocessing" or spec.get("prevalence"):
            raise ValueError(f"shift: segmenter runs have the preprocessing benchmark (shift=preprocessing), got "
                             f"benchmark={spec.get('benchmark')!r}, prevalence={spec.get('prevalence')}")
        rows = preprocessing_table(self, datamodule, split, dict(spec.get("augment") or datamodule.augment or {}),
                                   int(spec.get("seed", 0)))
        write_csv(Path(out_dir) / "metrics" / "shift_preprocessing.csv",
                  pd.DataFrame([{k: v for k, v in r.items() if k != "settings"} for r in rows]))
        out = {"split": split, "preprocessing": rows,
               "note": "each augmentation at probability 1 with the run's data.augment bounds, seeded; geometric ones "
                       "transform the ground truth too; metrics at the model's threshold (pooled pixels; Dice and IoU "
                       "per-image means)"}
        write_json(Path(out_dir) / "metrics" / "shift.json", out)
        return out

    @classmethod
    def compare(cls, runs: Sequence[RunModel], datamodule: Any, split: str, out_dir: Path,
                evaluation: Any = None, n_show: int = 6) -> list[dict[str, Any]]:
        from medtrust.evaluation.segmentation import compare_segmenters

        from medtrust.evaluation.config import evaluation_config

        on = str(evaluation_config("segmentation", evaluation).get("compare_on", "differ"))
        return compare_segmenters(runs, datamodule, split, out_dir, n_show, on)
