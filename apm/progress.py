"""How far a training run is: a step bar over the whole run, added to every ``apm fit`` /
``lightning fit``."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


def planned_steps(trainer: L.Trainer) -> int | None:
    """The optimizer steps the run will make: ``max_steps``, else ``max_epochs`` times the batches
    of an epoch; None when neither bounds it."""
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return int(trainer.max_steps)
    batches = trainer.num_training_batches
    if trainer.max_epochs and trainer.max_epochs > 0 and batches not in (None, float("inf")):
        return int(trainer.max_epochs * batches // max(trainer.accumulate_grad_batches, 1))
    return None


class StepProgressBar(TQDMProgressBar):
    """One bar over the whole run: ``step N/max_steps`` with tqdm's elapsed time, ETA and rate.

    Lightning's bars count batches within an epoch, which says nothing of a run bounded by steps
    (``Epoch 3/-2 ... 1/2``). A resumed run starts the bar at its restored step, so the rate and the
    ETA count only this process's steps. Without a bound on the steps it is Lightning's bar.
    """

    def on_train_start(self, trainer: L.Trainer, *_: Any) -> None:
        super().on_train_start(trainer)
        self._total = planned_steps(trainer)
        if self._total is not None:
            bar = self.train_progress_bar
            bar.reset(total=self._total)
            bar.initial = bar.n = trainer.global_step
            bar.set_description("step")
            bar.refresh()

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        if self._total is None:
            super().on_train_epoch_start(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self._total is None:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar, step = self.train_progress_bar, trainer.global_step
        if self._should_update(step, self._total) and not bar.disable:
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._total is None:
            super().on_train_epoch_end(trainer, pl_module)
