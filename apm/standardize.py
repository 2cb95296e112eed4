"""Per-level standardization of teacher features, with statistics gathered from the data.

Layers of one teacher differ in scale by orders of magnitude, so each level is mapped to
(f - mean) / std before the loss: ``mean`` per channel, ``std`` one scalar per level (the RMS of the
centred features), which keeps the geometry within a level while equalizing levels.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class LevelStandardizer(nn.Module):
    """Running per-level statistics (saved in checkpoints as buffers) and the maps to and from the
    standardized scale."""

    def __init__(self, dims: Sequence[int]):
        super().__init__()
        self.dims = list(dims)
        for i, d in enumerate(self.dims):
            self.register_buffer(f"mean_{i}", torch.zeros(d))
            self.register_buffer(f"std_{i}", torch.ones(()))
            self.register_buffer(f"sum_{i}", torch.zeros(d, dtype=torch.float64))
            self.register_buffer(f"sumsq_{i}", torch.zeros((), dtype=torch.float64))
        self.register_buffer("count", torch.zeros(len(self.dims), dtype=torch.float64))
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))

    def mean(self, level: int) -> torch.Tensor:
        return getattr(self, f"mean_{level}")

    def std(self, level: int) -> torch.Tensor:
        return getattr(self, f"std_{level}")

    @torch.no_grad()
    def update(self, feats: Sequence[torch.Tensor]) -> None:
        """Accumulate statistics of per-level features (B, ..., d)."""
        for i, f in enumerate(feats):
            f = f.reshape(-1, f.shape[-1]).double()
            getattr(self, f"sum_{i}").add_(f.sum(0))
            getattr(self, f"sumsq_{i}").add_(f.pow(2).sum())
            self.count[i] += f.shape[0]

    @torch.no_grad()
    def finalize(self) -> None:
        """Turn the accumulated sums into mean and std; marks the statistics ready.

        A level seen at one location only (a 1x1 level such as CLIP's ``global``, from a single
        image) has no spread to measure: it gets mean 0 and the RMS of its features as scale, as
        ``apm.perceive.image_statistics`` does for one image. Otherwise the scale never falls below
        1e-4 of that RMS, so a nearly constant level cannot blow its targets up by orders of
        magnitude."""
        for i, d in enumerate(self.dims):
            n = self.count[i].clamp_min(1)
            mean = getattr(self, f"sum_{i}") / n
            raw = getattr(self, f"sumsq_{i}") / n / d  # mean square around zero
            var = raw - mean.pow(2).sum() / d
            if self.count[i] < 2:
                mean, var = torch.zeros_like(mean), raw
            var = torch.maximum(var, 1e-8 * raw).clamp_min(1e-12)
            self.mean(i).copy_(mean.float())
            self.std(i).copy_(var.sqrt().float())
        self.ready.fill_(True)

    def encode(self, level: int, f: torch.Tensor) -> torch.Tensor:
        """Teacher scale -> standardized scale."""
        return (f - self.mean(level)) / self.std(level)

    def decode(self, level: int, z: torch.Tensor) -> torch.Tensor:
        """Standardized scale -> teacher scale."""
        return z * self.std(level) + self.mean(level)
