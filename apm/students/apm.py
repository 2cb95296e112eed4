"""The APM student: one CNN filter writes the image into a trigger column; one shared MLP answers
queries [T, PE(y, x), E(level)] independently, one per (location, level); (y, x) are continuous
(row, column) coordinates in [0, 1].

Where the level code E enters is a setting. ``level_entry="first"`` (the paper's design): the query
is [T, PE, E], so every (location, level) runs the whole MLP. ``level_entry="late"``: [T, PE] runs
the trunk once per location, and E enters the last hidden layer, [h, E]; that layer's h part is
level-free too, so a level asked at a location costs one add, a ReLU and its head.

The layer E enters is applied factorized: W [x, E] + b = (W_x x + b) + W_L E, and the first layer
likewise (W_T T + b) + W_P PE (+ W_L E). The column term is computed once per image, the positional
term once per grid, the level-free work once per location, the level term once per level.
``query_vectors`` and ``decode`` give the plain, unfactorized path for reference and tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Iterator, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from apm.codes import grid_coords
from apm.students.base import RGB, ColumnInput, StudentSettings
from teachers.base import IMAGENET_MEAN, IMAGENET_STD, Level, check_image_size, select_levels

LEVEL_ENTRIES = ("first", "late")
__all__ = ["APMSettings", "APMStudent", "LEVEL_ENTRIES", "RGB"]


def window_pixels(images: torch.Tensor, coords: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The ImageNet-normalized photograph (B, 3, H, W) in [0, 1] sampled bilinearly at ``offsets``
    (k, 2) pixels around each coordinate (N, 2) or (B, N, 2) in [0, 1]: (B, N, 3k). Pixel edges
    sit at integers, so (i + 1/2) / H is pixel i's centre; border pixels repeat past the edge."""
    b, _, height, width = images.shape
    c = coords.to(images.device, torch.float32)
    c = c[None].expand(b, -1, -1) if c.ndim == 2 else c
    size = c.new_tensor([height, width])
    grid = ((c[:, :, None] * size + offsets) / size * 2 - 1).flip(-1)  # grid_sample's (x, y) in [-1, 1]
    x = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    mean, std = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1), x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return rearrange((x - mean) / std, "b c n k -> b n (c k)")


def pick(table: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
    """Rows ``loc`` (B, n) of a coordinate table (P, 2) or (B, P, 2): (B, n, 2)."""
    if table.ndim == 2:
        return table[loc]
    return table.gather(1, loc[..., None].expand(-1, -1, table.shape[-1]))


class APMStudent(ColumnInput):
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
        level_entry: Where the level code enters: ``"first"`` layer (the paper's design) or the last
            hidden layer, ``"late"`` (with a single hidden layer, that is the first).
        column_filters: Output channels of the column filter (the paper's is 1): the trigger column
            holds ``column_filters`` numbers per patch.
        pixel_window, pixel_spacing: Evidence at the query point: the photograph's pixels on an n x n
            lattice, ``pixel_spacing`` px apart, around each query (``window_pixels``); 0: off.
    """

    def __init__(self, levels: Sequence[Level], image_size: int, patch_size: int, pe_dim: int = 256,
                 level_dim: int = 64, hidden_dims: Sequence[int] = (1024, 1024, 1024),
                 pe_max_freq: float = 64.0, level_entry: str = "first", column_filters: int = 1,
                 pixel_window: int = 0, pixel_spacing: float = 1.0):
        super().__init__()
        check_image_size(image_size, patch_size, "the student's patch size")
        if level_entry not in LEVEL_ENTRIES:
            raise ValueError(f"level_entry must be one of {LEVEL_ENTRIES}, got {level_entry!r}")
        if not hidden_dims:
            raise ValueError("hidden_dims needs at least one layer")
        self.level_entry = level_entry
        # index of the hidden layer the level code enters; with one layer, late is the first
        self.entry = len(hidden_dims) - 1 if level_entry == "late" else 0
        self.levels = list(levels)
        self.patch_size = patch_size
        self.grid = (image_size // patch_size, image_size // patch_size)
        if column_filters < 1:
            raise ValueError(f"column_filters must be at least 1, got {column_filters}")
        self.column_dim = column_filters * self.grid[0] * self.grid[1]
        self.pe_dim, self.level_dim, self.pe_max_freq = pe_dim, level_dim, pe_max_freq
        self.pixel_window, self.pixel_spacing = pixel_window, float(pixel_spacing)
        self.evidence_dim = 3 * pixel_window ** 2
        offsets = (torch.arange(pixel_window, dtype=torch.float32) - (pixel_window - 1) / 2) * pixel_spacing
        oy, ox = torch.meshgrid(offsets, offsets, indexing="ij")  # (dy, dx) in pixels, row-major
        self.register_buffer("window_offsets", torch.stack([oy.flatten(), ox.flatten()], -1), persistent=False)
        self.column = nn.Conv2d(3, column_filters, kernel_size=patch_size, stride=patch_size)
        self.level_embed = nn.Embedding(len(self.levels), level_dim)
        code = [level_dim if i == self.entry else 0 for i in range(len(hidden_dims))]  # E's inputs
        self.first = nn.Linear(self.column_dim + pe_dim + self.evidence_dim + code[0], hidden_dims[0])
        layers: list[nn.Module] = [nn.ReLU()]
        for i, (a, b) in enumerate(zip(hidden_dims[:-1], hidden_dims[1:]), start=1):
            layers += [nn.Linear(a + code[i], b), nn.ReLU()]
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(hidden_dims[-1], l.dim) for l in self.levels)
        for i, l in enumerate(self.levels):
            self.register_buffer(f"coords_{i}", grid_coords(l.grid), persistent=False)

    code_parameters = ("first.bias",)  # the first layer's bias: a per-image code (apm perceive)

    # -- the pieces of a query -------------------------------------------------------------------
    def evidence(self, images: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """The pixels each query sees (B, N, 3 * pixel_window^2) (``window_pixels``)."""
        return window_pixels(images, coords, self.window_offsets)

    def site(self, images: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """W_P PE(coords) + W_X (the pixels around each coordinate, with ``pixel_window``): (N, H1),
        or (B, N, H1) with evidence or coordinates (B, N, 2)."""
        pos = self.position_term(coords)
        if not self.evidence_dim:
            return pos
        start = self.column_dim + self.pe_dim
        w_x = self.first.weight[:, start : start + self.evidence_dim]
        return pos + self.evidence(images, coords).to(w_x.dtype) @ w_x.T

    def column_term(self, column: torch.Tensor) -> torch.Tensor:
        """W_T T + b: the part of the first layer shared by every query of an image. (B, H1)."""
        w_t = self.first.weight[:, : self.column_dim]
        return torch.nn.functional.linear(column, w_t, self.first.bias)

    def position_term(self, coords: torch.Tensor) -> torch.Tensor:
        """W_P PE(coords): the location's part of the first layer. (N, H1)."""
        w_p = self.first.weight[:, self.column_dim : self.column_dim + self.pe_dim]
        return self.positional(coords).to(w_p.dtype) @ w_p.T

    @property
    def entry_layer(self) -> nn.Linear:
        """The layer the level code enters: ``first``, or the last hidden layer when late."""
        return self.trunk[-2] if self.entry else self.first

    def _before_entry(self, first: torch.Tensor) -> torch.Tensor:
        """The level-free layers between the first layer's pre-activations and the entry layer."""
        return self.trunk[:-2](first) if self.entry else first

    def _after_entry(self, pre: torch.Tensor) -> torch.Tensor:
        """From the entry layer's pre-activations to the last hidden activations."""
        return self.trunk[-1:](pre) if self.entry else self.trunk(pre)

    def level_term(self, level: int | torch.Tensor) -> torch.Tensor:
        """W_L E(level): the level's part of the entry layer; (H,) for one level, (N, H) for a
        LongTensor (N,) of levels."""
        layer = self.entry_layer
        w_l = layer.weight[:, layer.in_features - self.level_dim :]  # (no [-0:]: level_dim may be 0)
        return self.level_embed.weight[level] @ w_l.T

    def locate(self, first: torch.Tensor) -> torch.Tensor:
        """The level-free part of the entry layer's pre-activations, from the first layer's [T, PE]
        pre-activations (..., H1): the work done once per location, whatever levels are asked there."""
        if not self.entry:
            return first
        layer = self.entry_layer
        w = layer.weight[:, : layer.in_features - self.level_dim]
        return F.linear(self._before_entry(first), w, layer.bias)

    def answer(self, col: torch.Tensor, level: int, pos: torch.Tensor) -> torch.Tensor:
        """One level's predictions (B, N, d) from the column term (B, H1) and W_P PE (N, H1)."""
        return self.heads[level](self._after_entry(self.locate(col[:, None] + pos) + self.level_term(level)))

    def query_vectors(self, column: torch.Tensor, level: int, coords: torch.Tensor,
                      images: torch.Tensor | None = None) -> torch.Tensor:
        """The plain first-layer inputs (B, N, ...): [T, PE(x, y), E(level)] as in the paper, or
        [T, PE(x, y)] when the level enters late (``decode`` then appends E); with
        ``pixel_window``, the pixels around (x, y) of ``images`` after PE."""
        b, n = column.shape[0], coords.shape[0]
        parts = [column[:, None].expand(b, n, -1), self.positional(coords).expand(b, n, -1)]
        if self.evidence_dim:
            if images is None:
                raise ValueError("a student with pixel_window needs the images for its query vectors")
            parts.append(self.evidence(images, coords))
        if not self.entry:
            parts.append(self.level_embed.weight[level].expand(b, n, -1))
        return torch.cat(parts, dim=-1)

    def decode(self, level: int, first: torch.Tensor) -> torch.Tensor:
        """Rest of the field MLP and the level's head, unfactorized, from the first layer's
        pre-activations of ``query_vectors``; a late level code is concatenated where it enters."""
        if not self.entry:
            return self.heads[level](self.trunk(first))
        h = self._before_entry(first)
        e = self.level_embed.weight[level].expand(*h.shape[:-1], -1)
        return self.heads[level](self._after_entry(self.entry_layer(torch.cat([h, e], dim=-1))))

    # -- whole forwards --------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, locations: Sequence[torch.Tensor | None],
                levels: Sequence[int] | None = None, hidden: bool = False,
                points: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
        """Predict selected locations of every level, or of ``levels`` only.

        Args:
            images: (B, 3, H, W) in [0, 1].
            locations: Per level (per entry of ``levels`` when given), either a LongTensor (B, n) of
                row-major location indices into that level's grid, or None for all its locations.
                Levels on one grid given the same tensor object (or None) share the level-free work
                of those locations.
            levels: Level indices to predict, in this order; default all. Levels left out are not
                computed at all (their heads get no gradient).
            hidden: Return each level's last hidden activations (B, n, H), the input of its head.
            points: Per level, None (its grid's cell centres) or a table of coordinates (P, 2) or
                (B, P, 2) in [0, 1] that ``locations`` index instead: points off the grid, such as
                the cells of a moved teacher pass (``apm.offgrid``). Levels given the same table
                object and locations share the level-free work.

        Returns:
            Per level, predictions (B, n, d) (or hidden activations) in the order of ``locations``.
        """
        levels = range(len(self.levels)) if levels is None else list(levels)
        if len(levels) != len(locations):
            raise ValueError(f"{len(locations)} location entries for {len(levels)} levels")
        col = self.column_term(self.trigger(images))  # (B, H1)
        grids: dict[tuple[int, int], torch.Tensor] = {}  # one table per grid: levels on it share work
        tables = [grids.setdefault(self.levels[lvl].grid, self.coords(lvl)) if t is None else t
                  for lvl, t in zip(levels, points or [None] * len(levels))]
        pos: dict[int, torch.Tensor] = {}  # W_P PE once per table, without evidence
        sites: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = []
        pres, sizes = [], []
        for lvl, loc, table in zip(levels, locations, tables):
            site = next((x for t, l, x in sites if t is table and l is loc), None)
            if site is None:  # the level-free work, once per distinct set of locations
                if self.evidence_dim or table.ndim == 3:
                    term = self.site(images, table if loc is None else pick(table, loc))
                else:
                    if id(table) not in pos:
                        pos[id(table)] = self.position_term(table)
                    term = pos[id(table)] if loc is None else pos[id(table)][loc]
                site = self.locate(col[:, None] + term)
                sites.append((table, loc, site))
            pres.append(site + self.level_term(lvl))
            sizes.append(site.shape[-2])
        last = self._after_entry(torch.cat(pres, dim=1)).split(sizes, dim=1)  # one pass for all levels
        if hidden:
            return list(last)
        return [self.finish(lvl, self.heads[lvl](h), table if loc is None else pick(table, loc))
                for lvl, h, loc, table in zip(levels, last, locations, tables)]

    def query(self, images: torch.Tensor, level: int, coords: torch.Tensor,
              chunk: int | None = None, column: torch.Tensor | None = None) -> torch.Tensor:
        """Predict one level at arbitrary coordinates (N, 2) in [0, 1], in chunks of ``chunk``
        queries. Returns (B, N, d); queries are independent, so chunking changes nothing.
        ``column``: the student's square input to read the trigger column from, when ``images``
        is the photograph at another size and aspect (the pixels around each query are then read
        from ``images``, at its own scale)."""
        col = self.column_term(self.trigger(images if column is None else column))
        return torch.cat([self.finish(level, self.answer(col, level, self.site(images, c)), c)
                          for c in coords.split(chunk or coords.shape[0])], dim=1)

    def dense(self, images: torch.Tensor, levels: Sequence[int] | None = None,
              chunk: int | None = None) -> list[torch.Tensor]:
        """All locations of the given levels (default all), each (B, h, w, d). Per grid and chunk of
        its locations (default all at once), W_P PE and the level-free work are done once and
        shared by every level on that grid; ``chunk`` bounds memory."""
        levels = select_levels(self.levels, levels)
        col = self.column_term(self.trigger(images))
        preds: dict[int, list[torch.Tensor]] = {lvl: [] for lvl in levels}
        for grid in dict.fromkeys(self.levels[lvl].grid for lvl in levels):
            on_grid = [lvl for lvl in levels if self.levels[lvl].grid == grid]
            coords = self.coords(on_grid[0])
            for c in coords.split(chunk or coords.shape[0]):
                site = self.locate(col[:, None] + self.site(images, c))
                for lvl in on_grid:
                    pred = self.heads[lvl](self._after_entry(site + self.level_term(lvl)))
                    preds[lvl].append(self.finish(lvl, pred, c))
        return [rearrange(torch.cat(preds[lvl], dim=1), "b (h w) d -> b h w d",
                          h=self.levels[lvl].grid[0], w=self.levels[lvl].grid[1]) for lvl in levels]

    # -- streaming: any queries, any order, bounded memory ---------------------------------------
    def stream(self, images: torch.Tensor, level_ids: torch.Tensor, coords: torch.Tensor,
               chunk: int = 4096) -> Iterator[tuple[torch.Tensor, int, torch.Tensor]]:
        """Answer an arbitrary list of (level, location) queries, ``chunk`` queries at a time.

        Beyond the inputs and the weights, memory is set by ``chunk`` (one chunk's activations),
        not by the number of queries or the image size; run it under ``torch.no_grad()``. Queries
        of one chunk at the same coordinates share the level-free work.

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
            where, which = torch.unique(c, dim=0, return_inverse=True)
            site = self.locate(col[:, None] + self.site(images, where))[:, which]
            hidden = self._after_entry(site + self.level_term(lv))
            counts = torch.bincount(lv, minlength=len(self.levels)).tolist()
            for lvl, (pos, h) in enumerate(zip(order.split(counts), hidden.split(counts, dim=1))):
                if len(pos):  # one pass through the trunk for every level in the chunk
                    yield start + pos, lvl, self.finish(lvl, self.heads[lvl](h), c[pos])


@dataclass
class APMSettings(StudentSettings):
    """The APM field student's settings (``model.student``; ``APMStudent``'s arguments).

    Args:
        pe_dim: Width of the 2-D sin-cos positional code.
        pe_max_freq: Highest frequency of the positional code in cycles per image side; null (the
            default): half the finest level's grid side, its Nyquist limit (higher frequencies
            alias on the grid the student is trained on). Checkpoints written before this setting
            existed used 64 and keep it.
        hidden_dims: Widths of the shared field MLP's layers.
        level_dim: Width of the learned level embedding.
        level_entry: Where the level code enters: ``late`` (the last hidden layer, so the layers
            before it run once per location for all levels) or ``first`` (the paper's design;
            every (location, level) runs the whole MLP). Checkpoints written before this setting
            existed are ``first``. See docs/architecture.md.
        column_filters: Output channels of the column filter; 1 is the paper's single filter, one
            number per patch. More let an unseen image's patch colours and textures through (see
            docs/perceive.md).
        pixel_window: Evidence at the query point: each query also sees the photograph's pixels on a
            ``pixel_window`` x ``pixel_window`` lattice around its own coordinate, sampled
            bilinearly, beside the trigger column; 0 (the default) is the paper's query. It lets the
            student answer between the teacher's cells (docs/field.md).
        pixel_spacing: Pixels between the window's samples.
    """

    name: ClassVar[str] = "apm"
    hidden_dims: list[int] = field(default_factory=lambda: [1024, 1024, 1024, 1024])
    level_dim: int = 64
    level_entry: str = "late"
    column_filters: int = 1
    pixel_window: int = 0
    pixel_spacing: float = 1.0

    def __post_init__(self) -> None:
        if self.pixel_window < 0 or not self.pixel_spacing > 0:
            raise ValueError(f"pixel_window {self.pixel_window} and pixel_spacing {self.pixel_spacing}: use "
                             f"a window of 0 (off) or more samples a side, spaced by a positive number of "
                             f"pixels (e.g. 7 and 2)")
        if self.level_entry not in LEVEL_ENTRIES:
            raise ValueError(f"level_entry {self.level_entry!r} is not one of {', '.join(LEVEL_ENTRIES)}")
        if self.column_filters < 1:
            raise ValueError(f"column_filters is {self.column_filters}; use 1 (the paper's single "
                             f"filter) or more")
        if not self.hidden_dims:
            raise ValueError("hidden_dims needs at least one layer")
