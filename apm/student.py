"""The APM student: one CNN filter writes the image into a trigger column; one shared MLP answers
queries [T, PE(x, y), E(level)] independently, one per (location, level).

The first layer is applied factorized: W [T, PE, E] + b = (W_T T + b) + W_P PE + W_L E. The column
term is computed once per image, the positional term once per grid, the level term once per level;
a query then costs one add before the second layer. ``query_vectors`` builds the plain
concatenated query for reference and tests.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from apm.codes import grid_coords, sincos_2d
from teachers.base import IMAGENET_MEAN, IMAGENET_STD, Level, check_image_size, level_indices


class APMStudent(nn.Module):
    """Column encoder, positional and level codes, a shared field MLP and per-level heads.

    Args:
        levels: The levels to predict (name, grid, width), e.g. the teacher's plus ``rgb``.
        image_size: Input side in pixels; a multiple of ``patch_size``.
        patch_size: Kernel and stride of the single column filter.
        pe_dim: Width of the 2-D sin-cos positional code (a multiple of 4).
        level_dim: Width of the learned level embedding.
        hidden_dims: Widths of the shared MLP's layers (ReLU after each). The paper's MLP is
            [2048, 4096, 4096, 4096, 2048, 1024].
        pe_max_freq: Highest frequency of the positional code, in cycles per image side (APMModule
            sets half the finest grid's side, its Nyquist limit).
    """

    def __init__(self, levels: Sequence[Level], image_size: int, patch_size: int, pe_dim: int = 256,
                 level_dim: int = 64, hidden_dims: Sequence[int] = (1024, 1024, 1024),
                 pe_max_freq: float = 64.0):
        super().__init__()
        check_image_size(image_size, patch_size, "the student's patch size")
        if not hidden_dims:
            raise ValueError("hidden_dims needs at least one layer")
        self.levels = list(levels)
        self.patch_size = patch_size
        self.grid = (image_size // patch_size, image_size // patch_size)
        self.column_dim = self.grid[0] * self.grid[1]
        self.pe_dim, self.level_dim, self.pe_max_freq = pe_dim, level_dim, pe_max_freq
        self.column = nn.Conv2d(3, 1, kernel_size=patch_size, stride=patch_size)
        self.level_embed = nn.Embedding(len(self.levels), level_dim)
        self.first = nn.Linear(self.column_dim + pe_dim + level_dim, hidden_dims[0])
        layers: list[nn.Module] = [nn.ReLU()]
        for a, b in zip(hidden_dims[:-1], hidden_dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(hidden_dims[-1], l.dim) for l in self.levels)
        for i, l in enumerate(self.levels):
            self.register_buffer(f"coords_{i}", grid_coords(l.grid), persistent=False)

    # -- the pieces of a query -------------------------------------------------------------------
    def trigger(self, images: torch.Tensor) -> torch.Tensor:
        """The trigger column T (B, h*w) of images (B, 3, H, W) in [0, 1]: the column filter on
        ImageNet-normalized images. The normalization is folded into the filter, so no normalized
        copy of the image is ever made (streaming memory stays independent of the image size)."""
        mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
        w = self.column.weight / std
        b = self.column.bias - (w * mean).sum()
        col = F.conv2d(images, w.to(images.dtype), b.to(images.dtype), stride=self.patch_size)
        return rearrange(col, "b 1 h w -> b (h w)")

    def coords(self, level: int) -> torch.Tensor:
        """Cell-centre coordinates (h*w, 2) of a level's grid, row-major, in [0, 1]."""
        return getattr(self, f"coords_{level}")

    def positional(self, coords: torch.Tensor) -> torch.Tensor:
        return sincos_2d(coords, self.pe_dim, self.pe_max_freq)

    def column_term(self, column: torch.Tensor) -> torch.Tensor:
        """W_T T + b: the part of the first layer shared by every query of an image. (B, H1)."""
        w_t = self.first.weight[:, : self.column_dim]
        return torch.nn.functional.linear(column, w_t, self.first.bias)

    def position_term(self, coords: torch.Tensor) -> torch.Tensor:
        """W_P PE(coords): the location's part of the first layer. (N, H1)."""
        w_p = self.first.weight[:, self.column_dim : self.column_dim + self.pe_dim]
        return self.positional(coords).to(w_p.dtype) @ w_p.T

    def level_term(self, level: int | torch.Tensor) -> torch.Tensor:
        """W_L E(level): the level's part of the first layer; (H1,) for one level, (N, H1) for a
        LongTensor (N,) of levels."""
        w_l = self.first.weight[:, self.column_dim + self.pe_dim :]
        return self.level_embed.weight[level] @ w_l.T

    def query_vectors(self, column: torch.Tensor, level: int, coords: torch.Tensor) -> torch.Tensor:
        """The plain queries [T, PE(x, y), E(level)] (B, N, col+pe+level), as in the paper."""
        b, n = column.shape[0], coords.shape[0]
        pe = self.positional(coords).expand(b, n, -1)
        e = self.level_embed.weight[level].expand(b, n, -1)
        return torch.cat([column[:, None].expand(b, n, -1), pe, e], dim=-1)

    def decode(self, level: int, first: torch.Tensor) -> torch.Tensor:
        """Rest of the field MLP and the level's head, from first-layer pre-activations."""
        return self.heads[level](self.trunk(first))

    # -- whole forwards --------------------------------------------------------------------------
    def forward(self, images: torch.Tensor,
                locations: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
        """Predict selected locations of every level.

        Args:
            images: (B, 3, H, W) in [0, 1].
            locations: Per level, either a LongTensor (B, n) of row-major location indices into that
                level's grid, or None for all its locations.

        Returns:
            Per level, predictions (B, n, d) in the order of ``locations``.
        """
        col = self.column_term(self.trigger(images))  # (B, H1)
        pos: dict[tuple[int, int], torch.Tensor] = {}  # W_P PE once per distinct grid, per step
        firsts, sizes = [], []
        for lvl, loc in enumerate(locations):
            grid = self.levels[lvl].grid
            if grid not in pos:
                pos[grid] = self.position_term(self.coords(lvl))  # (N_l, H1)
            q = pos[grid] if loc is None else pos[grid][loc]  # (N_l, H1) or (B, n, H1)
            firsts.append((col + self.level_term(lvl))[:, None] + q)
            sizes.append(q.shape[-2])
        hidden = self.trunk(torch.cat(firsts, dim=1))  # one pass for all levels' queries
        return [head(h) for head, h in zip(self.heads, hidden.split(sizes, dim=1))]

    def query(self, images: torch.Tensor, level: int, coords: torch.Tensor,
              chunk: int | None = None) -> torch.Tensor:
        """Predict one level at arbitrary coordinates (N, 2) in [0, 1], in chunks of ``chunk``
        queries. Returns (B, N, d); queries are independent, so chunking changes nothing."""
        return self._answer(self.column_term(self.trigger(images)), level, coords, chunk)

    def _answer(self, col: torch.Tensor, level: int, coords: torch.Tensor, chunk: int | None,
                pos: torch.Tensor | None = None) -> torch.Tensor:
        """One level's predictions (B, N, d) from the column term, chunk by chunk; ``pos`` is a
        precomputed W_P PE(coords) to reuse (only without chunking)."""
        base = col + self.level_term(level)  # (B, H1)
        if pos is not None:
            return self.decode(level, base[:, None] + pos)
        chunk = chunk or coords.shape[0]
        return torch.cat([self.decode(level, base[:, None] + self.position_term(c))
                          for c in coords.split(chunk)], dim=1)

    def dense(self, images: torch.Tensor, levels: Sequence[int] | None = None,
              chunk: int | None = None) -> list[torch.Tensor]:
        """All locations of the given levels (default all), each (B, h, w, d). Without ``chunk``,
        W_P PE is computed once per distinct grid and shared by the levels on it; with ``chunk``,
        per chunk, so that memory stays bounded by the chunk."""
        levels = level_indices(self.levels, levels)
        col = self.column_term(self.trigger(images))
        pos: dict[tuple[int, int], torch.Tensor] = {}
        out = []
        for lvl in levels:
            (h, w), coords = self.levels[lvl].grid, self.coords(lvl)
            if chunk is None and (h, w) not in pos:
                pos[(h, w)] = self.position_term(coords)
            pred = self._answer(col, lvl, coords, chunk, pos.get((h, w)) if chunk is None else None)
            out.append(rearrange(pred, "b (h w) d -> b h w d", h=h, w=w))
        return out

    # -- streaming: any queries, any order, bounded memory ---------------------------------------
    def stream(self, images: torch.Tensor, level_ids: torch.Tensor, coords: torch.Tensor,
               chunk: int = 4096) -> Iterator[tuple[torch.Tensor, int, torch.Tensor]]:
        """Answer an arbitrary list of (level, location) queries, ``chunk`` queries at a time.

        Beyond the inputs and the weights, memory is set by ``chunk`` (one chunk's activations),
        not by the number of queries or the image size; run it under ``torch.no_grad()``.

        Args:
            images: (B, 3, H, W) in [0, 1].
            level_ids: (N,) level index of each query.
            coords: (N, 2) query coordinates (y, x) in [0, 1], any order, repeats allowed.
            chunk: Queries per pass through the MLP.

        Yields:
            Per chunk and level present in it: ``(positions, level, predictions)``, where
            ``positions`` (n,) index the queries answered and ``predictions`` is (B, n, d_level).
        """
        if level_ids.shape[0] != coords.shape[0]:
            raise ValueError(f"{level_ids.shape[0]} level ids for {coords.shape[0]} coordinates")
        col = self.column_term(self.trigger(images))  # (B, H1), once per image
        for start in range(0, coords.shape[0], chunk):
            lv = level_ids[start : start + chunk].to(col.device)
            order = torch.argsort(lv, stable=True)  # group the chunk's queries by level
            lv, c = lv[order], coords[start : start + chunk].to(col.device)[order]
            hidden = self.trunk(col[:, None] + (self.position_term(c) + self.level_term(lv)))
            counts = torch.bincount(lv, minlength=len(self.levels)).tolist()
            for lvl, (pos, h) in enumerate(zip(order.split(counts), hidden.split(counts, dim=1))):
                if len(pos):  # one pass through the trunk for every level in the chunk
                    yield start + pos, lvl, self.heads[lvl](h)

    def predict_queries(self, images: torch.Tensor, level_ids: torch.Tensor, coords: torch.Tensor,
                        chunk: int = 4096) -> list[torch.Tensor]:
        """``stream`` collected: per level, (B, n_l, d_l) for that level's queries in input order
        (n_l = 0 for a level not asked)."""
        parts: list[list[torch.Tensor]] = [[] for _ in self.levels]
        for _, lvl, pred in self.stream(images, level_ids, coords, chunk):
            parts[lvl].append(pred)  # chunks come in order; a stable sort keeps positions ascending
        b = images.shape[0]
        return [torch.cat(p, dim=1) if p else images.new_zeros(b, 0, l.dim)
                for p, l in zip(parts, self.levels)]
