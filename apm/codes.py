"""Positional code of continuous coordinates, and the coordinates of a level's grid."""

from __future__ import annotations

import math

import numpy as np
import torch


def grid_coords(grid: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """Cell centres of an (h, w) grid as (h*w, 2) coordinates (y, x) in [0, 1], row-major.

    Continuous coordinates let levels with different grids share one positional field.
    """
    h, w = grid
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([yy.flatten(), xx.flatten()], dim=-1)


def sincos_2d(coords: torch.Tensor, dim: int, max_freq: float = 64.0) -> torch.Tensor:
    """2-D sine-cosine code (N, dim) of coordinates (N, 2) in [0, 1].

    A quarter of the channels each for sin(y), cos(y), sin(x), cos(x), at frequencies spaced
    geometrically from 1 to ``max_freq`` cycles per image side.
    """
    if dim % 4:
        raise ValueError(f"positional code dim must be a multiple of 4, got {dim}")
    n = dim // 4
    freqs = torch.logspace(0, math.log2(max_freq), n, base=2.0, device=coords.device)
    ang = 2 * math.pi * coords.float()[..., None] * freqs  # (N, 2, n)
    y, x = ang[..., 0, :], ang[..., 1, :]
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=-1)


def nearest_cells(n: int, cells: int) -> np.ndarray:
    """For each of ``n`` pixels along a side, the index of the grid cell (of ``cells`` along that
    side) its centre falls in: a grid map's nearest-neighbour upsampling, one rounding for all."""
    return np.minimum(((np.arange(n) + 0.5) * cells / n).astype(np.int64), cells - 1)
