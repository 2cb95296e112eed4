"""How far a training run is and how long it will take: a step bar over the whole run and a
one-time estimate of the total time, both added to every ``apm fit`` / ``lightning fit``."""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from tqdm import tqdm

# An estimate above this many seconds on a CPU comes with the advice to use a GPU.
GPU_ADVISED_S = 3600.0


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


def describe_seconds(s: float) -> str:
    """``45 s``, ``12 min``, ``3.4 h`` or ``2.1 days``."""
    if s < 90:
        return f"{s:.0f} s"
    if s < 90 * 60:
        return f"{s / 60:.0f} min"
    if s < 48 * 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


class TimeEstimate(L.Callback):
    """After a few steps, say once how long a step takes and what the whole run will take on this
    machine, and advise a GPU when a CPU run would take more than an hour.

    The first ``skip`` steps (start-up, the first teacher calls) are not timed; the estimate is made
    once at least ``min_steps`` steps and ``min_seconds`` seconds were timed, or after ``max_steps``
    steps. Validation and figures are not counted.
    """

    def __init__(self, skip: int = 2, min_steps: int = 3, min_seconds: float = 5.0, max_steps: int = 50):
        self.skip, self.min_steps, self.min_seconds, self.max_steps = skip, min_steps, min_seconds, max_steps
        self.estimate: dict[str, float] | None = None
        self._last_end: float | None = None
        self._timed = [0, 0.0]  # steps, seconds
        self._seen = 0  # training batches ended in this fit

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.estimate, self._last_end, self._timed, self._seen = None, None, [0, 0.0], 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        if self.estimate is not None:
            return
        now, self._seen = time.perf_counter(), self._seen + 1
        if self._last_end is not None and self._seen > self.skip:
            self._timed[0] += 1
            self._timed[1] += now - self._last_end
        self._last_end = now
        steps, seconds = self._timed
        if steps >= self.max_steps or (steps >= self.min_steps and seconds >= self.min_seconds):
            self._report(trainer, seconds / steps)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_end = None  # the step after validation is not timed: it would count validation

    def _report(self, trainer: L.Trainer, per_step: float) -> None:
        total = planned_steps(trainer)
        left = None if total is None else max(total - trainer.global_step, 0) * per_step
        self.estimate = {"seconds_per_step": per_step, "seconds_left": left if left is not None else float("nan")}
        if not trainer.is_global_zero:
            return
        device = type(trainer.accelerator).__name__.replace("Accelerator", "").lower() or "this device"
        line = f"time: {per_step:.3g} s a training step on {device}"
        if left is not None:
            line += (f"; the remaining {total - trainer.global_step} of {total} steps take about "
                     f"{describe_seconds(left)} (validation and figures not counted)")
        if device == "cpu" and left is not None and left > GPU_ADVISED_S:
            line += (". A GPU is advised for a run this long (README, 'What runs where'); "
                     "fewer trainer.max_steps finish sooner on this CPU")
        tqdm.write(line + ".", file=sys.stderr)
