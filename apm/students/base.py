"""What a student is: the ``Student`` interface every student implements, the settings base class,
and the pieces every student shares (``ColumnInput``: the image's patch filter with ImageNet
normalization folded in, the positional code, grid coordinates, collected queries).

A student answers queries (location, level): a level is a teacher layer (name, grid, width); a
location is a cell of that level's grid or any (y, x) in [0, 1]. ``APMModule`` trains one with the
standardized targets of each level; ``apm.perceive`` fits a copy of one to a new image by moving the
parameters that ``parts()`` names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Iterator, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from apm.codes import sincos_2d
from teachers.base import IMAGENET_MEAN, IMAGENET_STD, Level

RGB = "rgb"  # the pixel level: each patch's mean colour
PARTS = ("body", "heads", "code")


@dataclass
class StudentSettings:
    """The settings every student takes (``model.student``); each student subclasses this with its
    own fields and ``name``, the name it is registered under (``apm.students.registry``).

    Args:
        pe_dim: Width of the 2-D sin-cos positional code.
        pe_max_freq: Highest frequency of the positional code in cycles per image side; null:
            half the finest level's grid side (its Nyquist limit).
    """

    name: ClassVar[str] = ""
    pe_dim: int = 256
    pe_max_freq: float | None = None


@runtime_checkable
class Student(Protocol):
    """The interface ``APMModule``, ``apm.perceive``, the API and every tool use.

    Attributes:
        levels: The levels it predicts, in order (the teacher's, then ``rgb`` when on).
        patch_size: Side of the patch its column filter reads; ``grid`` = the image's patch grid.
        entry: > 0 when levels on one grid may share sampled query locations (their level-free
            work is shared), 0 when each level draws its own.
    """

    levels: list[Level]
    patch_size: int
    grid: tuple[int, int]
    entry: int

    def forward(self, images: torch.Tensor, locations: Sequence[torch.Tensor | None],
                levels: Sequence[int] | None = None, hidden: bool = False) -> list[torch.Tensor]:
        """Per level (of ``levels``, default all), predictions (B, n, d) at ``locations`` (B, n)
        row-major cell indices (None: every cell); ``hidden``: the heads' inputs (B, n, H) instead,
        which the heads' least-squares solve of ``apm.perceive`` regresses on."""

    def dense(self, images: torch.Tensor, levels: Sequence[int] | None = None,
              chunk: int | None = None) -> list[torch.Tensor]:
        """Every cell of the given levels, each (B, h, w, d); ``chunk`` bounds memory."""

    def query(self, images: torch.Tensor, level: int, coords: torch.Tensor,
              chunk: int | None = None) -> torch.Tensor:
        """One level at arbitrary coordinates (N, 2) in [0, 1]: (B, N, d)."""

    def stream(self, images: torch.Tensor, level_ids: torch.Tensor, coords: torch.Tensor,
               chunk: int = 4096) -> Iterator[tuple[torch.Tensor, int, torch.Tensor]]:
        """Any list of (level, coordinates) queries, ``chunk`` at a time: yields ``(positions,
        level, predictions (B, n, d))``."""

    def trigger(self, images: torch.Tensor) -> torch.Tensor:
        """The image's column (B, ...) that every answer starts from."""

    def column_term(self, column: torch.Tensor) -> torch.Tensor:
        """What the column contributes to every query of its image."""

    def position_term(self, coords: torch.Tensor) -> torch.Tensor:
        """What coordinates (N, 2) contribute to their queries."""

    def answer(self, col: torch.Tensor, level: int, pos: torch.Tensor) -> torch.Tensor:
        """One level's predictions (B, N, d) from ``column_term`` and ``position_term``
        (``apm interpolate`` mixes two images' columns)."""

    def parts(self) -> dict[str, tuple[str, ...]]:
        """Parameter-name prefixes of each part (``PARTS``): ``body`` (everything but the heads),
        ``heads`` (the per-level readouts, ``heads.<level>.weight``/``bias``) and ``code`` (a
        small per-image code a fit may move alone, e.g. APM's first-layer bias)."""


class ColumnInput(nn.Module):
    """The pieces every student shares: it reads the image through ``self.column`` (a Conv2d with
    kernel and stride ``patch_size``), knows its ``levels`` and their cell-centre ``coords_<i>``
    buffers, and codes positions with ``pe_dim`` and ``pe_max_freq``. A fitted field
    (``apm.field``) attaches its residual lattice as ``lattice``: every answer then passes through
    ``finish``; checkpoints carry it."""

    levels: list[Level]
    patch_size: int
    pe_dim: int
    pe_max_freq: float
    column: nn.Conv2d
    lattice: nn.Module | None

    def __init__(self) -> None:
        super().__init__()
        self.lattice = None

    def finish(self, level: int, pred: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """A level's answers (B, N, d) at ``coords`` (N, 2) or (B, N, 2): the heads', or with a
        fitted field's ``lattice``, its gain times them plus its interpolated residual."""
        return pred if self.lattice is None else self.lattice(level, pred, coords)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        from apm.field import PREFIX, ResidualLattice

        own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix + PREFIX)}
        self.lattice = ResidualLattice.from_state(own).to(self.column.weight.device) if own else None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def trigger(self, images: torch.Tensor) -> torch.Tensor:
        """The trigger column T (B, c*h*w) of images (B, 3, H, W) in [0, 1]: the column filter on
        ImageNet-normalized images. The normalization is folded into the filter, so no normalized
        copy of the image is ever made (streaming memory stays independent of the image size)."""
        mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
        w = self.column.weight / std
        b = self.column.bias - (w * mean).sum((1, 2, 3))
        col = F.conv2d(images, w.to(images.dtype), b.to(images.dtype), stride=self.patch_size)
        return rearrange(col, "b c h w -> b (c h w)")

    def coords(self, level: int) -> torch.Tensor:
        """Cell-centre coordinates (h*w, 2) of a level's grid, row-major, in [0, 1]."""
        return getattr(self, f"coords_{level}")

    code_parameters: ClassVar[tuple[str, ...]] = ()  # name prefixes of the per-image code

    def parts(self) -> dict[str, tuple[str, ...]]:
        """Parameter-name prefixes of the body (every module but the heads), the heads and the code."""
        body = tuple(f"{n}." for n, _ in self.named_children() if n != "heads")
        return {"body": body, "heads": ("heads.",), "code": self.code_parameters}

    def positional(self, coords: torch.Tensor) -> torch.Tensor:
        return sincos_2d(coords, self.pe_dim, self.pe_max_freq)

    def predict_queries(self, images: torch.Tensor, level_ids: torch.Tensor, coords: torch.Tensor,
                        chunk: int = 4096) -> list[torch.Tensor]:
        """``stream`` collected: per level, (B, n_l, d_l) for that level's queries in input order
        (n_l = 0 for a level not asked)."""
        parts: list[list[torch.Tensor]] = [[] for _ in self.levels]
        for _, lvl, pred in self.stream(images, level_ids, coords, chunk):
            parts[lvl].append(pred)  # chunks come in order; positions ascend within a level
        b = images.shape[0]
        return [torch.cat(p, dim=1) if p else images.new_zeros(b, 0, l.dim)
                for p, l in zip(parts, self.levels)]
