"""The distillation objective, shared by training, Reptile, ``apm perceive``, ``APM.perceive`` and
``apm classify``: which (location, level) queries a step asks, and the weighted mean over levels of
the MSE on each level's standardized features."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

from teachers.base import Level


class QuerySampler:
    """Per level, ``ceil(queries_per_image / levels)`` random distinct locations per image, or every
    location (None) when sampling is off (0 or None) or that covers the grid. With ``share`` (the
    student's level code enters late) levels on one grid are asked at the same locations: the
    student then runs the level-free work once per location and supervises every level there."""

    def __init__(self, levels: Sequence[Level], queries_per_image: int | None, share: bool):
        self.keys = [l.grid if share else i for i, l in enumerate(levels)]
        n = math.ceil(queries_per_image / len(levels)) if queries_per_image else None
        self.sampled: dict[Any, tuple[int, int]] = {}
        for key, lvl in zip(self.keys, levels):
            if n is not None and n < lvl.num_locations:
                self.sampled.setdefault(key, (n, lvl.num_locations))

    def draw(self, batch: int, device: torch.device,
             generators: Sequence[torch.Generator] | None = None) -> dict[str, torch.Tensor]:
        """One draw, (batch, n) locations per sampled key (keys as strings, for ``vmap``): from the
        global RNG, or from one generator per image (reproducible per image, on the CPU)."""
        out = {}
        for key, (n, total) in self.sampled.items():
            if generators is None:
                out[str(key)] = torch.rand(batch, total, device=device).argsort(1)[:, :n]
            else:
                out[str(key)] = torch.stack([torch.randperm(total, generator=g)[:n] for g in generators]).to(device)
        return out

    def per_level(self, drawn: dict[str, torch.Tensor]) -> list[torch.Tensor | None]:
        """The draw as one entry per level (the same tensor for levels that share a grid)."""
        return [drawn.get(str(k)) for k in self.keys]


def gather(target: torch.Tensor, loc: torch.Tensor | None) -> torch.Tensor:
    """A level's features (B, h, w, d) or (B, h*w, d) at the locations ``loc`` (B, n), or all."""
    if target.ndim == 4:
        target = rearrange(target, "b h w d -> b (h w) d")
    return target if loc is None else target.gather(1, loc[..., None].expand(-1, -1, target.shape[-1]))


def weighted_mse(preds: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                 weights: Sequence[float]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The loss: the weighted mean over levels of each level's MSE (predictions against
    standardized targets, both (..., n, d)); and the per-level MSEs."""
    losses = [F.mse_loss(p.float(), t) for p, t in zip(preds, targets)]
    total = sum(w * l for w, l in zip(weights, losses))
    return total / max(sum(weights), 1e-12), losses


def warmup_cosine(step: int, warmup: int, total: int | None, final: float) -> float:
    """The learning-rate factor at ``step``: linear warm-up over ``warmup`` steps, then a cosine
    decay to ``final`` at ``total`` (constant after the warm-up when ``total`` is unknown)."""
    if step < warmup:
        return (step + 1) / warmup
    if not total:
        return 1.0
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * t))
