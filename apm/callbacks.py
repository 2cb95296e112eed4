"""Lightning callbacks for side work during training."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import lightning as L
import torch


class IslandFigures(L.Callback):
    """Every ``every_n_val_epochs`` validation epochs, draw island figures (input | teacher |
    student, a row per level) for the first ``num_images`` validation images.

    The PNGs go to ``<log_dir>/islands/step<NNNNNN>-<i>.png`` (``trainer.log_dir``: the first
    logger's folder, or ``trainer.default_root_dir`` without one) and, when a WandbLogger is
    attached, to wandb as images under ``islands``.

    Args:
        every_n_val_epochs: Draw on every n-th validation epoch (the sanity check is skipped).
        num_images: How many validation images (the first ones, always the same) to draw.
        levels: Level names or indices to draw; default all.
        method: ``tsne`` (joint t-SNE of teacher and student per level) or ``pca`` (cheaper).
        perplexity: t-SNE perplexity.
        max_iter: t-SNE iterations; fewer is faster and coarser.
        k: k-means clusters of the ARI shown beside each level.
        seed: Seed of the embedding and of k-means.
        display: Pixels per panel.
    """

    def __init__(self, every_n_val_epochs: int = 1, num_images: int = 2,
                 levels: Sequence[str | int] | None = None, method: str = "tsne",
                 perplexity: float = 30.0, max_iter: int = 1000, k: int = 8, seed: int = 0,
                 display: int = 160):
        from apm.errors import ConfigError
        from apm.islands import METHODS

        if every_n_val_epochs < 1 or num_images < 1:
            raise ConfigError("IslandFigures: 'every_n_val_epochs' and 'num_images' must be at least 1.")
        if method not in METHODS:
            raise ConfigError(f"IslandFigures: 'method' is {method!r}; use one of {', '.join(METHODS)}.")
        self.every, self.num_images, self.levels = every_n_val_epochs, num_images, levels
        self.method, self.perplexity, self.max_iter = method, perplexity, max_iter
        self.k, self.seed, self.display = k, seed, display
        self.val_epochs = 0
        self.written: list[Path] = []

    def _images(self, trainer: L.Trainer) -> torch.Tensor | None:
        ds = getattr(trainer.datamodule, "val_set", None) if trainer.datamodule is not None else None
        if ds is not None and len(ds) > 0:
            items = [ds[i] for i in range(min(self.num_images, len(ds)))]
            items = [x[0] if isinstance(x, (tuple, list)) else x for x in items]
            return torch.stack(items)
        loaders = trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        got: list[torch.Tensor] = []
        for batch in loader or []:
            got += list(batch[0] if isinstance(batch, (tuple, list)) else batch)
            if len(got) >= self.num_images:
                break
        return torch.stack(got[: self.num_images]) if got else None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.val_epochs += 1
        if self.val_epochs % self.every:
            return
        out = Path(trainer.log_dir or trainer.default_root_dir) / "islands"  # every rank calls log_dir
        if not trainer.is_global_zero:
            return
        images = self._images(trainer)
        if images is None:
            return
        from apm.tools import island_figures, resolve_levels

        levels = resolve_levels([l.name for l in pl_module.levels],
                                [str(l) for l in self.levels] if self.levels else None)
        step = trainer.global_step
        names = [f"step{step:06d}-{i}" for i in range(len(images))]
        was_training = pl_module.training
        pl_module.eval()
        try:
            paths = island_figures(pl_module, images, names, out, levels, self.method,
                                   self.perplexity, self.seed, self.k, self.max_iter, self.display)
        finally:
            pl_module.train(was_training)
        self.written += paths
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="islands", images=[str(p) for p in paths], step=step,
                                 caption=[p.stem for p in paths])
