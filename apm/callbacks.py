"""Lightning callbacks for side work during training."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from apm.analysis import island_figures
from apm.data import batch_images
from apm.skipping import readable_items
from teachers.base import select_levels


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

    def _images(self, trainer: L.Trainer) -> torch.Tensor | None:
        """The first ``num_images`` readable validation images; unreadable files are skipped with
        the warning training gives them (the datamodule's SkipLog: once per file)."""
        dm = trainer.datamodule
        ds = getattr(dm, "val_set", None) if dm is not None else None
        if ds is not None and len(ds) > 0:
            items = readable_items(ds, self.num_images, getattr(dm, "skip_log", None))
            items = [image for image, _ in items]  # APMDataModule items are (image, index)
            return torch.stack(items) if items else None
        loaders = trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        got: list[torch.Tensor] = []
        for batch in loader or []:
            got += list(batch_images(batch)[0])
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
        levels = select_levels(pl_module.levels,
                               [str(l) for l in self.levels] if self.levels else None, "IslandFigures.levels")
        step = trainer.global_step
        names = [f"step{step:06d}-{i}" for i in range(len(images))]
        was_training = pl_module.training
        pl_module.eval()
        try:
            paths = island_figures(pl_module, images, names, out, levels, self.method,
                                   self.perplexity, self.seed, self.k, self.max_iter, self.display)
        finally:
            pl_module.train(was_training)
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="islands", images=[str(p) for p in paths], step=step,
                                 caption=[p.stem for p in paths])


def _last_path(cb: ModelCheckpoint) -> str:
    if cb.last_model_path:
        return cb.last_model_path
    return os.path.join(cb.dirpath, cb.CHECKPOINT_NAME_LAST + cb.FILE_EXTENSION)


class CheckpointOnStop(L.Callback):
    """Save ``last.ckpt`` when a SIGTERM or a Ctrl-C (SIGINT) stops the run and when training ends
    after the last periodic save, and say how to continue.

    SIGTERM: Lightning raises at the end of the current batch on every rank. Ctrl-C during training
    is turned into the same stop (the step in progress finishes, so the saved state is whole); a
    second Ctrl-C quits at once without saving. The file is the one every
    ``ModelCheckpoint(save_last=True)`` writes, so ``--ckpt_path last`` resumes from it; without such
    a callback it goes next to the first ModelCheckpoint's files.
    """

    def __init__(self) -> None:
        self._stop_signal: int | None = None
        self._previous_sigint: Any = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_signal = None
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous_sigint = signal.signal(signal.SIGINT, self._sigint_handler(trainer))

    def _sigint_handler(self, trainer: L.Trainer):
        def handler(signum: int, frame: Any) -> None:
            if self._stop_signal is not None:
                raise KeyboardInterrupt  # the second Ctrl-C
            self._stop_signal = signum
            # Lightning's own SIGTERM flag: it stops at the end of this batch and raises SIGTERMException
            trainer._signal_connector.received_sigterm = True
            if trainer.is_global_zero:
                print("\nCtrl-C: finishing this step, then saving last.ckpt (Ctrl-C again quits without "
                      "saving).", file=sys.stderr, flush=True)
        return handler

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def _targets(self, trainer: L.Trainer, stopping: bool) -> list[tuple[ModelCheckpoint | None, str]]:
        cbs = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
        lasts = [cb for cb in cbs if cb.save_last and cb.dirpath]
        if lasts:
            return [(cb, _last_path(cb)) for cb in lasts]
        if not stopping:
            return []
        folder = cbs[0].dirpath if cbs and cbs[0].dirpath else trainer.default_root_dir
        return [(None, os.path.join(folder, "last.ckpt"))]

    def _save(self, trainer: L.Trainer, stopping: bool) -> list[str]:
        saved = []
        for cb, path in self._targets(trainer, stopping):
            if cb is not None:
                if getattr(cb, "_last_global_step_saved", -1) == trainer.global_step and os.path.exists(path):
                    continue  # already current
                cb.last_model_path = path  # part of the saved state, as ModelCheckpoint does
            trainer.save_checkpoint(path, weights_only=False)
            if cb is not None and hasattr(cb, "_last_global_step_saved"):
                cb._last_global_step_saved = trainer.global_step
            saved.append(path)
        return saved

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.fast_dev_run:
            self._save(trainer, stopping=False)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.sanity_checking or trainer.fast_dev_run:
            return
        signum = self._stop_signal or signal.SIGTERM
        exception.signum = signum  # read by apm.cli.main for the exit status
        saved = self._save(trainer, stopping=True)
        if trainer.is_global_zero:
            where = ", ".join(str(Path(p).resolve()) for p in saved) or "the last checkpoint (already current)"
            what = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
            print(f"Received {what}: saved {where} at step {trainer.global_step}; continue the run "
                  f"with the same command plus --ckpt_path last.", file=sys.stderr, flush=True)


class SetAsideEarlierCheckpoints(L.Callback):
    """A new run (not resumed with ``--ckpt_path``) whose checkpoint folders hold an earlier run's
    ``*.ckpt`` files moves them into ``<folder>/previous/`` first (replacing what an older run left
    there) and says so in one line.

    The folder then holds this run's checkpoints only: ``last.ckpt`` is this run's (Lightning would
    otherwise write ``last-v1.ckpt`` beside the old one) and there is one ``best-*.ckpt``. One earlier
    run is kept, so running a config again by mistake loses nothing that ``previous/`` does not hold.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path is not None:
            return
        if trainer.is_global_zero:
            folders = {cb.dirpath for cb in trainer.checkpoint_callbacks
                       if isinstance(cb, ModelCheckpoint) and cb.dirpath}
            for folder in sorted(folders):
                set_aside(Path(folder))
        trainer.strategy.barrier("SetAsideEarlierCheckpoints")


def set_aside(folder: Path) -> list[Path]:
    """Move ``folder``'s ``*.ckpt`` files into ``folder/previous/`` (emptied first); return the
    moved files' new paths."""
    earlier = sorted(folder.glob("*.ckpt")) if folder.is_dir() else []
    if not earlier:
        return []
    previous = folder / "previous"
    shutil.rmtree(previous, ignore_errors=True)
    previous.mkdir()
    moved = [Path(shutil.move(str(f), previous / f.name)) for f in earlier]
    print(f"A new run in {folder}: the earlier run's {', '.join(f.name for f in earlier)} moved to "
          f"{previous}/ (to continue a run instead, add --ckpt_path last).", file=sys.stderr, flush=True)
    return moved


def add_defaults(plugins: Any, callbacks: Any, progress_bar: bool = True) -> tuple[list, list]:
    """The trainer's plugins and callbacks plus AtomicCheckpointIO, CheckpointOnStop,
    SetAsideEarlierCheckpoints, TimeEstimate and (with ``progress_bar``) StepProgressBar, each
    unless one of its kind is already given."""
    from lightning.fabric.plugins import CheckpointIO
    from lightning.pytorch.callbacks import ProgressBar

    from apm.checkpoints import AtomicCheckpointIO
    from apm.progress import StepProgressBar, TimeEstimate

    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    callbacks = [] if callbacks is None else list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    defaults = [(CheckpointOnStop, CheckpointOnStop), (SetAsideEarlierCheckpoints, SetAsideEarlierCheckpoints),
                (TimeEstimate, TimeEstimate)] + ([(ProgressBar, StepProgressBar)] if progress_bar else [])
    for kind, make in defaults:
        if not any(isinstance(c, kind) for c in callbacks):
            callbacks.append(make())
    return plugins, callbacks
