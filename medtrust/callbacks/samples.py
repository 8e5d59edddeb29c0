"""A grid of generated samples per modality every N validation epochs (figures/ and W&B)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only


def validation_prompts(datamodule: Any, per_modality: int, split: str = "val") -> list[tuple[str, int]]:
    """The first ``per_modality`` (text, modality) pairs of each modality in ``split`` (as served,
    i.e. with the evaluation prompt template)."""
    ds = datamodule.dataset(split)
    seen: dict[int, list[tuple[str, int]]] = {}
    for i in range(len(ds)):
        item = ds[i]
        m = int(item["modality"])
        if len(seen.setdefault(m, [])) < per_modality:
            seen[m].append((str(item["text"]), m))
    return [p for m in sorted(seen) for p in seen[m]]


class SampleGridCallback(L.Callback):
    """Sample ``per_modality`` validation prompts of every modality with fixed seeds every
    ``every_n_epochs`` epochs (and at the last epoch); one row per modality in
    ``<out_dir>/samples_epoch<k>.png``, logged to W&B as ``samples/grid``."""

    def __init__(self, out_dir: str, every_n_epochs: int = 5, per_modality: int = 4, steps: int = 25,
                 seed: int = 0) -> None:
        self.out_dir, self.every = Path(out_dir), max(1, int(every_n_epochs))
        self.per_modality, self.steps, self.seed = int(per_modality), int(steps), int(seed)
        self._prompts: list[tuple[str, int]] | None = None
        self.written: list[Path] = []

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and epoch + 1 >= trainer.max_epochs
        if (epoch + 1) % self.every and not last:
            return
        from medtrust.report.figures import plot_image_grid

        if self._prompts is None:
            self._prompts = validation_prompts(trainer.datamodule, self.per_modality)
        texts = [t for t, _ in self._prompts]
        mods = [m for _, m in self._prompts]
        was_training = pl_module.training
        imgs = pl_module.generate(texts, mods, [self.seed + i for i in range(len(texts))], steps=self.steps)
        if was_training:
            pl_module.train()
        groups: dict[str, list] = {}
        for img, text, m in zip(imgs, texts, mods):
            groups.setdefault(pl_module.modalities[m], []).append((img.permute(1, 2, 0).numpy(), text[:40]))
        path = plot_image_grid(groups, self.out_dir / f"samples_epoch{epoch:03d}.png", f"epoch {epoch}: samples")
        self.written.append(path)
        for lg in trainer.loggers:
            if type(lg).__name__ == "WandbLogger":
                lg.log_image(key="samples/grid", images=[str(path)], step=trainer.global_step,
                             caption=[f"epoch {epoch}"])
