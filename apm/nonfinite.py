"""Training that survives a NaN or infinite loss: the step is skipped and counted, and too many in a
row stop the run with a message on what to change."""

from __future__ import annotations

import logging

import torch

from apm.errors import NonFiniteLossError

log = logging.getLogger(__name__)


class NonFiniteGuard:
    """Counts non-finite losses (in a row and in all); raises after ``limit`` in a row.

    Args:
        limit: ``model.max_nonfinite_steps``.
        meta_inner_steps, lr, meta_inner_lr: the settings the message suggests changing (meta mode
            optimizes by hand, where Lightning refuses ``gradient_clip_val``).
    """

    def __init__(self, limit: int, meta_inner_steps: int, lr: float, meta_inner_lr: float):
        self.limit = max(1, int(limit))
        self.meta_inner_steps, self.lr, self.meta_inner_lr = meta_inner_steps, lr, meta_inner_lr
        self.in_a_row = self.total = 0

    def check(self, loss: torch.Tensor, step: int | str, strategy=None) -> bool:
        """Whether ``loss`` is finite (on every rank of a distributed ``strategy``)."""
        finite = bool(torch.isfinite(loss).all())
        if strategy is not None:
            finite = bool(strategy.reduce_boolean_decision(finite, all=True))
        if finite:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.total += 1
        log.warning("step %s: the loss is %s; step skipped (%d in a row, %d in all)", step,
                    loss.detach().float().item(), self.in_a_row, self.total)
        if self.in_a_row >= self.limit:
            raise NonFiniteLossError(
                f"Training stopped at step {step}: the loss was NaN or infinite in {self.limit} steps "
                f"in a row ({self.total} skipped in all), the most that setting "
                f"'model.max_nonfinite_steps' allows. Usual fixes: {self._fixes()}, 'trainer.precision: "
                f"32-true', or a look at the images of those steps. Continue from the last good state "
                f"with --ckpt_path last.")
        return False

    def _fixes(self) -> str:
        if self.meta_inner_steps:
            return (f"a lower 'model.meta_inner_lr' (now {self.meta_inner_lr:g}) or 'model.lr' (now "
                    f"{self.lr:g}), fewer 'model.meta_inner_steps'")
        return f"a lower 'model.lr' (now {self.lr:g}) or more 'model.warmup_steps', 'trainer.gradient_clip_val: 1.0'"
