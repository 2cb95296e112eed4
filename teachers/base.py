"""The interface every teacher adapter implements.

A teacher is a frozen network whose layers are GLOM's levels. Given images in [0, 1] it returns one
tensor per level, shaped (B, h, w, d): patch tokens only (no CLS, no registers), row-major, so that
``features[level][b, i, j]`` is the token of the patch in row ``i``, column ``j`` of image ``b``.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from teachers.errors import ConfigError, TeacherUnavailableError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Teacher precisions: "32" runs the teacher in fp32 whatever autocast is active around it (the
# default: targets, level statistics and caches then never depend on trainer.precision); "bf16" and
# "16" run it under autocast in that dtype, faster, at a small measured error (docs/benchmarks.md).
TEACHER_PRECISIONS = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}


@dataclass(frozen=True)
class Level:
    """One level of a teacher: its name, token grid (rows, cols) and feature width."""

    name: str
    grid: tuple[int, int]
    dim: int

    @property
    def num_locations(self) -> int:
        return self.grid[0] * self.grid[1]


class Teacher(nn.Module, ABC):
    """A frozen feature extractor with named levels.

    Subclasses set ``patch_size`` and ``image_size`` in ``__init__``, build their network, call
    ``self.freeze()``, and implement ``levels`` and ``extract``. ``forward`` runs ``extract`` under
    ``torch.no_grad`` in eval mode, so a teacher never trains and never builds a graph.
    """

    patch_size: int
    image_size: int
    precision: str = "32"  # a key of TEACHER_PRECISIONS; set with ``set_precision``
    weights_source: str | None = None  # where the weights came from, where an adapter says so

    @property
    @abstractmethod
    def levels(self) -> list[Level]:
        """The levels this teacher returns, in the order ``forward`` returns them."""

    @abstractmethod
    def extract(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per-level features (B, h, w, d) for images (B, 3, H, W) in [0, 1], RGB."""

    def freeze(self) -> "Teacher":
        """Turn off gradients for every parameter and switch to eval mode."""
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def set_precision(self, precision: str) -> "Teacher":
        """Run the teacher in ``precision`` ("32", "bf16" or "16"), whatever autocast surrounds it."""
        if str(precision) not in TEACHER_PRECISIONS:
            raise ValueError(f"teacher precision {precision!r}; use one of {', '.join(TEACHER_PRECISIONS)}")
        self.precision = str(precision)
        return self

    def train(self, mode: bool = True) -> "Teacher":
        # Frozen: dropout and the like stay off even when the parent module trains.
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per-level features (B, h, w, d), float32, of images (B, 3, H, W) in [0, 1], computed in
        the teacher's ``precision`` (fp32 by default, even inside an autocast region). Images of
        another size than ``image_size`` (a teacher that takes any size, at full resolution) give
        each level's grid scaled with them."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"teacher expects images (B, 3, H, W), got {tuple(images.shape)}")
        dtype = TEACHER_PRECISIONS[self.precision]
        with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
            feats = [f.float() for f in self.extract(images)]
        height, width = images.shape[-2:]
        for f, lvl in zip(feats, self.levels):
            grid = (round(lvl.grid[0] * height / self.image_size), round(lvl.grid[1] * width / self.image_size))
            if tuple(f.shape[1:]) != (*grid, lvl.dim):
                raise RuntimeError(
                    f"{type(self).__name__} level {lvl.name!r} returned {tuple(f.shape)} for images of "
                    f"{height}x{width} px; its spec says (B, {grid[0]}, {grid[1]}, {lvl.dim})"
                )
        return feats

    def describe(self) -> dict:
        """What identifies this teacher's features (for caches and checkpoints)."""
        return {
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "image_size": self.image_size,
            "levels": [(l.name, list(l.grid), l.dim) for l in self.levels],
        }


def normalize(images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Standard per-channel normalization of images in [0, 1]."""
    m = images.new_tensor(mean).view(1, 3, 1, 1)
    s = images.new_tensor(std).view(1, 3, 1, 1)
    return (images - m) / s


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed the CPU generator inside the block only, so a random-weight teacher (or a fresh
    student) is the same every time it is built, on any machine (a checkpoint rebuilds it from its
    name, arguments and seed). Weights are initialized on the CPU; the CUDA generators are neither
    seeded nor disturbed (``torch.manual_seed`` would reseed them and ``fork_rng(devices=[])``
    would not restore them)."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield


def _fix(setting: str) -> str:
    return f"Fix {setting} on the command line." if setting.startswith("-") else "Fix the list in your config."


def select_levels(levels: Sequence[str | Level], wanted: Sequence[int | str] | None,
                  setting: str = "levels", default: Sequence[int] | None = None) -> list[int]:
    """The one level resolver: the indices into ``levels`` (names or ``Level``s) of a selection by
    index, negative index or name; ``default`` (else all) when ``wanted`` is None.

    Raises ConfigError naming ``setting`` and the valid choices when one is out of range.
    """
    names = [l if isinstance(l, str) else l.name for l in levels]
    if wanted is None:
        return list(default if default is not None else range(len(names)))
    if isinstance(wanted, (int, str)):
        wanted = [wanted]
    out = []
    for w in wanted:
        if isinstance(w, str) and not w.lstrip("-").isdigit():
            if w not in names:
                raise ConfigError(
                    f"Setting {setting!r}: level {w!r} is not a level of this teacher. Valid names are "
                    f"{', '.join(names)}; integer indices 0..{len(names) - 1} (or negative, from the "
                    f"end) work too. {_fix(setting)}"
                )
            out.append(names.index(w))
            continue
        i = int(w)
        if not -len(names) <= i < len(names):
            raise ConfigError(
                f"Setting {setting!r}: level index {i} is out of range; this teacher has "
                f"{len(names)} levels, indices 0..{len(names) - 1} ({names[0]} .. {names[-1]}), or "
                f"negative from the end. {_fix(setting)}"
            )
        out.append(i % len(names))
    if len(set(out)) != len(out):
        raise ConfigError(f"Setting {setting!r}: a level is selected twice in {list(wanted)}.")
    return out


def check_image_size(image_size: int, multiple: int, what: str) -> None:
    """ConfigError naming 'data.image_size' and the two nearest valid sizes when ``image_size`` is
    not a multiple of ``multiple`` (``what``: e.g. "DINOv2's patch size")."""
    if image_size % multiple:
        lo = image_size // multiple * multiple
        raise ConfigError(
            f"Setting 'data.image_size': {image_size} is not a multiple of {what} {multiple}; the "
            f"nearest valid sizes are {max(lo, multiple)} and {lo + multiple}."
        )


def weights_unavailable(what: str, error: BaseException, cache: str,
                        fixes: Sequence[str] = ()) -> TeacherUnavailableError:
    """The one-paragraph error for pretrained weights that could not be loaded: ``what`` failed
    with ``error``; ``cache`` says where downloaded weights are kept; ``fixes`` are ways forward
    beside running once online and a random-weight teacher."""
    reason = (str(error).splitlines() or [""])[0][:200]
    ways = [f"run once with network access (the weights are cached under {cache})", *fixes,
            "set 'model.teacher_args.pretrained: false' to distill a random-weight teacher of the "
            "same architecture"]
    return TeacherUnavailableError(
        f"Could not load {what} ({type(error).__name__}: {reason}). This machine is probably "
        f"offline and the weights are not in that cache. Either {', '.join(ways[:-1])}, or {ways[-1]}."
    )
