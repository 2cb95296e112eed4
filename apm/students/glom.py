"""GLOM (Hinton 2021, "How to represent part-whole hierarchies in a neural network") as a student,
beside APM's (``model.student: GLOMSettings``).

A column of level embeddings at every location of the student's grid (one location per
``patch_size`` patch), the levels stacked bottom to top: ``rgb`` (when on) at the bottom, then the
teacher's levels in their order. The state ``e`` is (B, L, N, D): L levels, N locations, width D.

    bottom input   x = W_c * patch + W_p PE(y, x)          (a patch embedding and a 2-D sin-cos code)
    iteration 0    e_l = LN(f_bu_l(e_{l-1})), e_{-1} = x  (one bottom-up pass)
    iteration t    e_l <- LN(g_l0 e_l + g_l1 f_bu_l(e_{l-1}) + g_l2 f_td_l([e_{l+1}, PE]) + g_l3 A(e_l))
    readout        y_l = head_l(e_l) after T iterations

Every level has its own bottom-up and top-down nets (two-layer MLPs) and gains g, shared by every
location and every iteration; all levels update at once from the previous iteration's states.
``LN`` is a layer norm without affine parameters, so every state has norm sqrt(D) and T iterations
cannot blow up. ``A`` is GLOM's attention within a level, with no keys, queries or parameters:

    A(X)_i = sum_j softmax_j(beta (x_i . x_j + a x'_i . x'_j) / sqrt(D)) x_j

over the level's N locations (optionally only those within ``window`` cells), where x' are the
states of the level above and ``a`` (``agreement``) lets agreement there sharpen the attention here.
Each vector moves toward the mean of the vectors it resembles, so the iterations grow islands of
identical vectors. It runs in blocks of ``chunk`` rows: memory (B, L, chunk, N), not (B, L, N, N).

Queries: the columns run on the whole grid (the answers for all locations cost one run), and a
query reads the final state where it falls. A level on the student's grid is read at its cells; a
level on another grid (MViTv2's, CLIP's 1x1 ``global``) reads the states resampled to its grid
(an average over the cells it covers when its grid divides the student's, else bilinear); a query at
arbitrary coordinates (y, x) in [0, 1] interpolates the level's grid bilinearly (edges clamped), so
at cell centres it gives exactly what ``dense`` gives. Queries do not change each other's answers,
but unlike APM's they are not independent computations: every answer depends on the whole image.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Iterator, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from apm.codes import grid_coords
from apm.objective import gather
from apm.students.base import RGB, ColumnInput, StudentSettings
from teachers.base import Level, check_image_size, select_levels

class LevelMLP(nn.Module):
    """One two-layer GELU MLP per level, all levels in one einsum: (B, L, N, d_in) -> (B, L, N,
    d_out). ``side`` (N, d_side), shared by every image and level (the positional code), enters the
    first layer through its own per-level weights."""

    def __init__(self, levels: int, d_in: int, hidden: int, d_out: int, d_side: int = 0):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(levels, d_in, hidden))
        self.w_side = nn.Parameter(torch.empty(levels, d_side, hidden)) if d_side else None
        self.b1 = nn.Parameter(torch.empty(levels, hidden))
        self.w2 = nn.Parameter(torch.empty(levels, hidden, d_out))
        self.b2 = nn.Parameter(torch.empty(levels, d_out))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialization, per level: uniform in +-1/sqrt(fan_in)."""
        fan_in = self.w1.shape[1] + (0 if self.w_side is None else self.w_side.shape[1])
        for p, fan in ((self.w1, fan_in), (self.w_side, fan_in), (self.b1, fan_in),
                       (self.w2, self.w2.shape[1]), (self.b2, self.w2.shape[1])):
            if p is not None:
                nn.init.uniform_(p, -1 / math.sqrt(fan), 1 / math.sqrt(fan))

    def forward(self, x: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        h = torch.einsum("blnd,ldh->blnh", x, self.w1) + self.b1[:, None]
        if side is not None:
            h = h + torch.einsum("nk,lkh->lnh", side.to(h.dtype), self.w_side)
        return torch.einsum("blnh,lho->blno", F.gelu(h), self.w2) + self.b2[:, None]

    def one(self, level: int, x: torch.Tensor) -> torch.Tensor:
        """One level's MLP (without ``side``) on x (B, N, d_in): (B, N, d_out)."""
        return F.gelu(x @ self.w1[level] + self.b1[level]) @ self.w2[level] + self.b2[level]


class Gains(nn.Module):
    """Per level, the weights of the four contributions to an update: the previous state, the
    bottom-up, the top-down and the attention term (all 1 at the start)."""

    def __init__(self, levels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(levels, 4))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def same_level_attention(x: torch.Tensor, beta: float = 1.0, chunk: int | None = None,
                         cells: torch.Tensor | None = None, window: int | None = None,
                         above: torch.Tensor | None = None, agreement: float = 0.0) -> torch.Tensor:
    """GLOM's attention within a level: softmax(beta X X^T / sqrt(D)) X over the locations.

    Args:
        x: States (..., N, D).
        beta: Inverse temperature.
        chunk: Rows per block (memory (..., chunk, N)); default all at once.
        cells: (N, 2) integer (row, column) of each location, for ``window``.
        window: Attend only to locations within this many cells (Chebyshev distance); None = all.
        above: States of the level above (..., N, D'); its similarities, times ``agreement``, are
            added to the logits (agreement there sharpens attention here).
        agreement: Weight of the level above's similarities.

    Returns:
        (..., N, D): each vector replaced by the softmax-weighted mean of the vectors.
    """
    n, d = x.shape[-2:]
    scale = beta / math.sqrt(d)
    out = []
    for start in range(0, n, chunk or n):
        rows = slice(start, start + (chunk or n))
        logits = scale * x[..., rows, :] @ x.transpose(-1, -2)
        if above is not None and agreement:
            up = beta / math.sqrt(above.shape[-1]) * agreement
            logits = logits + up * above[..., rows, :] @ above.transpose(-1, -2)
        if window is not None:
            far = (cells[rows, None, :] - cells[None, :, :]).abs().amax(-1) > window
            logits = logits.masked_fill(far, float("-inf"))
        out.append(torch.softmax(logits.float(), dim=-1).to(x.dtype) @ x)
    return torch.cat(out, dim=-2)


def bilinear_taps(coords: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear interpolation on a grid of cell centres (edges clamped) at coordinates (n, 2) in
    [0, 1]: the 4 row-major cell indices (n, 4) and their weights (n, 4)."""
    h, w = grid
    y = coords[:, 0].float() * h - 0.5
    x = coords[:, 1].float() * w - 0.5
    y0, x0 = y.floor(), x.floor()
    wy, wx = y - y0, x - x0
    rows = [(y0 + a).clamp(0, h - 1).long() for a in (0, 1)]
    cols = [(x0 + a).clamp(0, w - 1).long() for a in (0, 1)]
    idx = torch.stack([rows[a] * w + cols[b] for a in (0, 1) for b in (0, 1)], dim=-1)
    wts = torch.stack([(wy if a else 1 - wy) * (wx if b else 1 - wx) for a in (0, 1) for b in (0, 1)], -1)
    return idx, wts


def sample(feats: torch.Tensor, idx: torch.Tensor, wts: torch.Tensor) -> torch.Tensor:
    """Features (B, N, D) read at ``bilinear_taps``: (B, n, D)."""
    return (feats[:, idx] * wts[..., None].to(feats.dtype)).sum(-2)


def resample_matrix(src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """(N_dst, N_src): a map from features on grid ``src`` to grid ``dst``: the mean of the cells
    each destination cell covers when ``dst`` divides ``src``, else bilinear at its centres."""
    n_src = src[0] * src[1]
    if src[0] % dst[0] == 0 and src[1] % dst[1] == 0:
        fy, fx = src[0] // dst[0], src[1] // dst[1]
        cell = torch.arange(n_src)
        owner = (cell // src[1] // fy) * dst[1] + (cell % src[1]) // fx
        return F.one_hot(owner, dst[0] * dst[1]).T.float() / (fy * fx)
    idx, wts = bilinear_taps(grid_coords(dst), src)
    return torch.zeros(dst[0] * dst[1], n_src).scatter_add_(1, idx, wts)


@dataclass
class GLOMSettings(StudentSettings):
    """GLOM's settings (``model.student``; docs/glom.md), each optional.

    Args:
        pe_dim: Width of the 2-D sin-cos positional code (bottom input and top-down nets).
        pe_max_freq: Its highest frequency in cycles per image side; null: half the finest level's
            grid side.
        dim: Width D of every level's state.
        hidden: Hidden width of the bottom-up and top-down nets.
        iterations: T, the updates after the bottom-up pass (0: the bottom-up pass alone).
        beta: Inverse temperature of the same-level attention.
        window: Attention only within this many cells (Chebyshev); null = the whole grid.
        agreement: Weight of the level above's similarities in a level's attention logits.
        chunk: Attention rows per block (bounds memory at large grids).
        every_iteration: Train on every iteration's readout, not only the last (training only).
        attention: False drops the attention term from the update (an ablation).
        top_down: False drops the top-down term from the update (an ablation).
    """

    name: ClassVar[str] = "glom"
    dim: int = 128
    hidden: int = 256
    iterations: int = 3
    beta: float = 1.0
    window: int | None = None
    agreement: float = 0.0
    chunk: int = 256
    every_iteration: bool = False
    attention: bool = True
    top_down: bool = True

    def __post_init__(self) -> None:
        for key in ("dim", "hidden", "iterations", "chunk"):
            v, least = getattr(self, key), 0 if key == "iterations" else 1
            if int(v) != v or v < least:
                raise ValueError(f"{key} must be a whole number >= {least}, got {v!r}")
        if self.window is not None and (int(self.window) != self.window or self.window < 0):
            raise ValueError(f"window must be null or a whole number of cells >= 0, got {self.window!r}")


# GLOM's own settings (beyond the positional code's) and their defaults
GLOM_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(GLOMSettings)
                                 if f.name not in ("pe_dim", "pe_max_freq")}


def glom_settings(glom: dict[str, Any] | None) -> dict[str, Any]:
    """GLOM's own settings with defaults filled in; ValueError naming an unknown or invalid key."""
    given = dict(glom or {})
    unknown = sorted(set(given) - set(GLOM_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; the settings are {', '.join(GLOM_DEFAULTS)}")
    s = asdict(GLOMSettings(**given))
    return {k: s[k] for k in GLOM_DEFAULTS}


class GLOMStudent(ColumnInput):
    """GLOM's columns, iterated, with a head per level: the ``Student`` interface
    (``apm.students.base``; the patch embedding is ``ColumnInput.trigger``).

    Args:
        levels: The levels to predict (name, grid, width); ``rgb`` goes to the bottom of the column.
        image_size: Input side in pixels; a multiple of ``patch_size``.
        patch_size: Kernel and stride of the patch embedding: one column per patch.
        pe_dim: Width of the 2-D sin-cos positional code (bottom input and top-down nets).
        pe_max_freq: Its highest frequency, in cycles per image side.
        glom: GLOM's own settings, the fields of ``GLOMSettings`` beyond the positional code's
            (``dim``, ``hidden``, ``iterations``, ...), each with its default there.
    """

    entry = 1  # levels on one grid are asked at the same sampled locations (apm.objective)

    def __init__(self, levels: Sequence[Level], image_size: int, patch_size: int, pe_dim: int = 64,
                 pe_max_freq: float = 8.0, **glom: Any):
        super().__init__()
        check_image_size(image_size, patch_size, "the student's patch size")
        s = glom_settings(glom)
        self.settings = s
        self.levels, self.patch_size = list(levels), patch_size
        self.grid = (image_size // patch_size,) * 2
        self.pe_dim, self.pe_max_freq, self.dim = pe_dim, pe_max_freq, s["dim"]
        # the column, bottom to top: rgb first, then the other levels in order
        self.stack = sorted(range(len(self.levels)), key=lambda i: self.levels[i].name != RGB)
        self.slot = {lvl: k for k, lvl in enumerate(self.stack)}
        n = len(self.levels)
        self.column = nn.Conv2d(3, s["dim"], kernel_size=patch_size, stride=patch_size)
        self.position = nn.Linear(pe_dim, s["dim"])
        self.bottom_up = LevelMLP(n, s["dim"], s["hidden"], s["dim"])
        self.top_down = (LevelMLP(n - 1, s["dim"], s["hidden"], s["dim"], pe_dim)
                         if s["top_down"] and n > 1 else None)
        self.gains = Gains(n)
        self.heads = nn.ModuleList(nn.Linear(s["dim"], l.dim) for l in self.levels)
        cells = torch.stack(torch.meshgrid(torch.arange(self.grid[0]), torch.arange(self.grid[1]),
                                           indexing="ij"), -1)
        self.register_buffer("cells", rearrange(cells, "h w c -> (h w) c"), persistent=False)
        self.register_buffer("pe", torch.empty(0), persistent=False)
        self.set_positional(pe_max_freq)
        for i, l in enumerate(self.levels):
            self.register_buffer(f"coords_{i}", grid_coords(l.grid), persistent=False)
            if tuple(l.grid) != self.grid:
                self.register_buffer(f"resample_{i}", resample_matrix(self.grid, tuple(l.grid)),
                                     persistent=False)

    def set_positional(self, pe_max_freq: float) -> None:
        """The positional code of the grid's cell centres at this top frequency."""
        self.pe_max_freq = pe_max_freq
        device = self.cells.device
        self.pe = self.positional(grid_coords(self.grid, device))

    # -- the columns -----------------------------------------------------------------------------
    def column_term(self, column: torch.Tensor) -> torch.Tensor:
        """The bottom input x (B, N, D) from ``trigger``'s patch embedding (B, D*N)."""
        x = rearrange(column, "b (d n) -> b n d", d=self.dim)
        return x + self.position(self.pe.to(x.dtype))

    def step(self, e: torch.Tensor, x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """One synchronous update of every level's state e (B, L, N, D) from the bottom input x
        (B, N, D); ``chunk``: attention rows per block (default the setting)."""
        s, g = self.settings, self.gains.weight.to(e.dtype)[:, None, :, None]  # (L, 1, 4, 1)
        total = g[:, :, 0] * e + g[:, :, 1] * self.bottom_up(torch.cat([x[:, None], e[:, :-1]], 1))
        if self.top_down is not None:
            td = self.top_down(e[:, 1:], self.pe)
            total = total + g[:, :, 2] * torch.cat([td, torch.zeros_like(e[:, :1])], 1)
        if s["attention"]:
            above = torch.cat([e[:, 1:], torch.zeros_like(e[:, :1])], 1) if s["agreement"] else None
            att = same_level_attention(e, s["beta"], chunk or s["chunk"], self.cells, s["window"], above,
                                       s["agreement"])
            total = total + g[:, :, 3] * att
        return F.layer_norm(total, (self.dim,))

    def run(self, x: torch.Tensor, iterations: int | None = None,
            chunk: int | None = None) -> list[torch.Tensor]:
        """The states (B, L, N, D) after the bottom-up pass and after each of ``iterations``
        (default T) updates, from the bottom input x (B, N, D)."""
        e, below = [], x
        for k in range(len(self.levels)):  # iteration 0: bottom-up, level by level
            below = F.layer_norm(self.bottom_up.one(k, below), (self.dim,))
            e.append(below)
        states = [torch.stack(e, 1)]
        for _ in range(self.settings["iterations"] if iterations is None else iterations):
            states.append(self.step(states[-1], x, chunk))
        return states

    def columns(self, images: torch.Tensor, iterations: int | None = None,
                chunk: int | None = None) -> list[torch.Tensor]:
        """``run`` on images (B, 3, H, W) in [0, 1]."""
        return self.run(self.column_term(self.trigger(images)), iterations, chunk)

    # -- readout ---------------------------------------------------------------------------------
    def level_states(self, e: torch.Tensor, level: int) -> torch.Tensor:
        """A level's states on its own grid (B, N_l, D), from the column states (B, L, N, D)."""
        states = e[:, self.slot[level]]
        if tuple(self.levels[level].grid) == self.grid:
            return states
        return getattr(self, f"resample_{level}").to(states.dtype) @ states

    def readout(self, e: torch.Tensor, locations: Sequence[torch.Tensor | None],
                levels: Sequence[int], hidden: bool = False) -> list[torch.Tensor]:
        """Per level, the head (or, ``hidden``, its input) at ``locations`` (B, n) (None: all) of
        the states e."""
        states = [gather(self.level_states(e, lvl), loc) for lvl, loc in zip(levels, locations)]
        if hidden:
            return states
        return [self.finish(lvl, self.heads[lvl](x), self.coords(lvl) if loc is None else self.coords(lvl)[loc])
                for lvl, x, loc in zip(levels, states, locations)]

    def forward(self, images: torch.Tensor, locations: Sequence[torch.Tensor | None],
                levels: Sequence[int] | None = None, hidden: bool = False) -> list[torch.Tensor]:
        """Predict selected locations of every level, or of ``levels`` only, after T iterations
        (``APMStudent.forward``'s contract: per level (B, n) indices or None; returns (B, n, d), or
        with ``hidden`` the heads' inputs (B, n, D))."""
        levels = self._levels(locations, levels)
        return self.readout(self.columns(images)[-1], locations, levels, hidden)

    def iterate(self, images: torch.Tensor, locations: Sequence[torch.Tensor | None],
                levels: Sequence[int] | None = None) -> list[list[torch.Tensor]]:
        """``forward`` at every iteration 1..T (0..0 when T = 0): a list of its answers."""
        levels = self._levels(locations, levels)
        states = self.columns(images)
        return [self.readout(e, locations, levels) for e in states[1:] or states]

    def _levels(self, locations: Sequence[Any], levels: Sequence[int] | None) -> list[int]:
        levels = list(range(len(self.levels))) if levels is None else list(levels)
        if len(levels) != len(locations):
            raise ValueError(f"{len(locations)} location entries for {len(levels)} levels")
        return levels

    def dense(self, images: torch.Tensor, levels: Sequence[int] | None = None,
              chunk: int | None = None, iterations: int | None = None) -> list[torch.Tensor]:
        """All locations of the given levels (default all), each (B, h, w, d); ``chunk`` (attention
        rows per block) bounds memory; ``iterations`` reads an earlier iteration (default T)."""
        levels = select_levels(self.levels, levels)
        e = self.columns(images, iterations, chunk)[-1]
        return [rearrange(p, "b (h w) d -> b h w d", h=self.levels[lvl].grid[0])
                for lvl, p in zip(levels, self.readout(e, [None] * len(levels), levels))]

    # -- queries at any coordinates --------------------------------------------------------------
    def position_term(self, coords: torch.Tensor) -> torch.Tensor:
        """Where queries read the states: the coordinates themselves (for ``answer``)."""
        return coords

    def answer(self, col: torch.Tensor, level: int, pos: torch.Tensor) -> torch.Tensor:
        """One level's predictions (B, n, d) at coordinates ``pos`` (n, 2), from the bottom input
        ``column_term`` gives (as ``APMStudent.answer``; ``apm interpolate`` mixes inputs)."""
        return self._read(self.run(col)[-1], level, pos)

    def _read(self, e: torch.Tensor, level: int, coords: torch.Tensor) -> torch.Tensor:
        idx, wts = bilinear_taps(coords.to(e.device), tuple(self.levels[level].grid))
        return self.finish(level, self.heads[level](sample(self.level_states(e, level), idx, wts)), coords)

    def query(self, images: torch.Tensor, level: int, coords: torch.Tensor,
              chunk: int | None = None) -> torch.Tensor:
        """One level at arbitrary coordinates (N, 2) in [0, 1]: (B, N, d); the columns run once,
        the reads go ``chunk`` queries at a time."""
        e = self.columns(images)[-1]
        return torch.cat([self._read(e, level, c) for c in coords.split(max(1, chunk or len(coords)))], 1)

    def stream(self, images: torch.Tensor, level_ids: torch.Tensor, coords: torch.Tensor,
               chunk: int = 4096) -> Iterator[tuple[torch.Tensor, int, torch.Tensor]]:
        """``APMStudent.stream``'s contract: any (level, location) queries, ``chunk`` at a time;
        yields ``(positions, level, predictions (B, n, d))``. The columns run once per call;
        beyond them, memory follows ``chunk``."""
        if level_ids.shape[0] != coords.shape[0]:
            raise ValueError(f"{level_ids.shape[0]} level ids for {coords.shape[0]} coordinates")
        e = self.columns(images)[-1]
        for start in range(0, coords.shape[0], chunk):
            lv = level_ids[start : start + chunk].to(e.device)
            c = coords[start : start + chunk].to(e.device)
            for lvl in torch.unique(lv).tolist():
                pos = (lv == lvl).nonzero().flatten()
                yield start + pos, lvl, self._read(e, lvl, c[pos])
