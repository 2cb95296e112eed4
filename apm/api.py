"""The Python API: load a trained student in one line, ask it for features anywhere, and fit it to
new images.

    from apm import APM

    apm = APM.from_pretrained("runs/apm/checkpoints/last.ckpt")   # device="auto"
    f = apm.features("photo.jpg", "block12")                   # (h, w, d) on the teacher's grid
    f2 = apm.features("photo.jpg", "block12", size=(64, 64))   # any output grid: more queries
    v = apm.at("photo.jpg", "block12", [[0.5, 0.5], [0.1, 0.9]])  # (y, x) in [0, 1] -> (2, d)
    fitted = apm.perceive("photo.jpg")                         # test-time fitting; fitted.apm, fitted.record

Images are file paths, ``skimage:NAME``, PIL images, HxWx3 uint8 arrays, or tensors shaped
(3, H, W) or (B, 3, H, W), float in [0, 1] or uint8 in 0..255; each is resized and centre-cropped to the student's input
size as in training. One image gives features without a batch axis, a (B, 3, H, W) tensor with one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from einops import rearrange

from apm.codes import grid_coords
from apm.errors import ConfigError

ImageLike = Any  # str | Path | PIL.Image.Image | np.ndarray | torch.Tensor


@dataclass
class Perception:
    """The result of ``APM.perceive`` for one image: the fitted student and its record (steps,
    seconds, whether the target was reached, R^2 per level before and after)."""

    apm: "APM"
    record: dict[str, Any]


class APM:
    """A student (an ``APMModule`` with its frozen teacher) behind a small API."""

    def __init__(self, module):
        self.module = module.eval()

    # -- loading ----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "auto") -> "APM":
        """A trained student from a checkpoint of ``apm fit`` or ``apm perceive``, or a folder
        written by ``save_pretrained``."""
        from apm.module import APMModule

        return cls(APMModule.from_checkpoint(path, device, trained=True))

    @classmethod
    def from_config(cls, *configs: str | Path, device: str | torch.device = "auto", **overrides: Any) -> "APM":
        """A fresh, untrained student of LightningCLI configs' teacher and student settings, read
        by LightningCLI's parser (later configs override earlier ones; ``overrides`` replace model
        settings), for ``perceive`` from scratch."""
        from apm.cli import load_student
        from apm.precision import pick_device

        return cls(load_student(configs=configs, device=pick_device(device), overrides=overrides))

    # -- what it knows ----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.module.device

    @property
    def image_size(self) -> int:
        return int(self.module.hparams.image_size)

    @property
    def levels(self) -> list[str]:
        """Level names, in order (the teacher's levels, then ``rgb`` when on)."""
        return [l.name for l in self.module.levels]

    def grid(self, level: str | int) -> tuple[int, int]:
        """The teacher's grid (rows, cols) of a level."""
        return tuple(self.module.levels[self._level(level)].grid)

    def _level(self, level: str | int) -> int:
        from teachers.base import select_levels

        return select_levels(self.levels, [level], "level")[0]

    def prepare(self, image: ImageLike) -> torch.Tensor:
        """Images as the student sees them: (B, 3, S, S) in [0, 1] on the student's device."""
        return self._read(image)[0]

    def _read(self, image: ImageLike) -> tuple[torch.Tensor, str | None]:
        """``prepare``'s images and, for a path or ``skimage:NAME``, the name the commands key it
        by (its seed comes from that name, as in ``apm perceive``)."""
        from PIL import Image

        from apm.data import image_transform, read_images, to_rgb

        tf = image_transform(self.image_size)
        if isinstance(image, torch.Tensor):
            x = image.float() / 255 if image.dtype == torch.uint8 else image.float()
            if x.ndim == 3:
                x = x[None]
            if x.ndim != 4 or x.shape[1] != 3:
                raise ConfigError(f"An image tensor must be (3, H, W) or (B, 3, H, W) in [0, 1]; got "
                                  f"{tuple(image.shape)}.")
            return torch.stack([tf(i) for i in x.cpu()]).to(self.device), None
        if isinstance(image, (str, Path)):  # a file or skimage:NAME, read as the commands read them
            loaded = read_images([str(image)], self.image_size, "image")
            if len(loaded) != 1:
                raise ConfigError(f"Image {str(image)!r} holds {len(loaded)} images; these methods take one "
                                  f"image, or several as a (B, 3, H, W) tensor (torch.cat of APM.prepare "
                                  f"of each).")
            return loaded[0].image[None].to(self.device), loaded[0].name
        if isinstance(image, np.ndarray):
            pil = to_rgb(Image.fromarray(image))
        elif isinstance(image, Image.Image):
            pil = to_rgb(image)
        else:
            raise ConfigError(f"Cannot read an image from a {type(image).__name__}; give a path, "
                              f"skimage:NAME, a PIL image, an HxWx3 array or a (3, H, W) tensor.")
        return tf(pil)[None].to(self.device), None

    @staticmethod
    def _unbatch(image: ImageLike, x: torch.Tensor) -> torch.Tensor:
        return x if isinstance(image, torch.Tensor) and image.ndim == 4 else x[0]

    # -- features ---------------------------------------------------------------------------------
    @torch.no_grad()
    def at(self, image: ImageLike, level: str | int, coords: Sequence[Sequence[float]] | torch.Tensor,
           chunk: int = 16384) -> torch.Tensor:
        """The student's features of one level at arbitrary (y, x) coordinates in [0, 1] (N, 2),
        on the teacher's scale: (N, d), or (B, N, d) for a batch. ``chunk`` queries per pass
        bound the memory; queries are independent, so the answers do not depend on it."""
        x = self.prepare(image)
        lvl = self._level(level)
        c = torch.as_tensor(coords, dtype=torch.float32, device=self.device).reshape(-1, 2)
        return self._unbatch(image, self.module.query_features(lvl, c, x, chunk=chunk))

    def features(self, image: ImageLike, level: str | int, size: int | tuple[int, int] | None = None,
                 chunk: int = 16384) -> torch.Tensor:
        """The student's features of one level on a grid of cell centres, (h, w, d) or
        (B, h, w, d): the teacher's grid by default, or any ``size`` (rows, cols) (the positional
        code is continuous: a finer grid is just more queries)."""
        grid = self.grid(level) if size is None else ((size, size) if isinstance(size, int) else tuple(size))
        out = self.at(image, level, grid_coords(grid), chunk)
        return rearrange(out, "... (h w) d -> ... h w d", h=grid[0], w=grid[1])

    @torch.no_grad()
    def teacher_features(self, image: ImageLike, level: str | int) -> torch.Tensor:
        """The teacher's features of one level, (h, w, d) or (B, h, w, d) (``rgb``: patch colours)."""
        return self._unbatch(image, self.module.targets(self.prepare(image))[self._level(level)])

    # -- new images -------------------------------------------------------------------------------
    @property
    def trained(self) -> bool:
        """Whether the student has been distilled or fitted (it has level statistics); False for
        ``from_config``."""
        return bool(self.module.standardizer.ready)

    def perceive(self, image: ImageLike, target_r2: float | None = None, max_steps: int | None = None,
                 protocol: str = "ours", init: str | None = None, lr: float | None = None,
                 seed: int = 0, levels: Sequence[str | int] | None = None,
                 progress: bool = True, moves: str | None = None, solve_heads: bool | None = None,
                 ridge: float | None = None, resolve_every: int | None = None, passes: int | None = None,
                 field: bool | None = None) -> Perception | list[Perception]:
        """Fit a copy of this student to the image's teacher features (see ``apm perceive``); a
        (B, 3, H, W) tensor fits B independent copies at once and returns a list. A trained student
        asked for no gradient setting (``apm.perceive.GRADIENT``) takes the field route
        (``field=True``, below; ``field=False`` for the gradient fit); otherwise the student is
        fitted until its mean R^2 over ``levels`` (names or indices; default all) reaches
        ``target_r2`` (0.9) or ``max_steps`` (500). ``init`` defaults to ``trained`` for a trained
        student and ``fresh`` for one from ``from_config`` (the official protocol is always fresh). A path is seeded as
        ``apm perceive`` seeds it (from its name); in-memory image b of a call is seeded
        ``seed + b``. ``moves``, ``solve_heads``, ``ridge`` and ``resolve_every`` choose the route
        (``apm perceive --help``): ``solve_heads=True`` reaches R^2 0.9 in one step from a
        distilled student; with ``moves="body", resolve_every=1`` and ``target_r2=0.98`` about ten
        steps fit it as well as the full fit. ``passes=4`` fits on four teacher passes moved by
        {0, 7}^2 px, at the points where their cells sit, so the student answers between the
        grid's cells (docs/field.md). ``field=True`` is the field route: no gradient step, this
        student's answers scaled per level plus the interpolation of what they missed at the cells
        of ``passes`` (4) teacher passes (``apm.field``). This student is not changed."""
        from apm.perceive import FitRecipe, field_by_default, perceive_images
        from apm.runlog import image_seed

        x, name = self._read(image)
        if init is None and protocol != "official":
            init = "trained" if self.trained else "fresh"
        given = {k: v for k, v in dict(target_r2=target_r2, max_steps=max_steps, lr=lr, moves=moves,
                                       solve_heads=solve_heads, ridge=ridge, resolve_every=resolve_every,
                                       passes=passes).items() if v is not None}
        if field is None:
            field = field_by_default(protocol, init, given)
        recipe = FitRecipe(protocol=protocol, init=init, levels=levels, field=field, **given)
        seeds = [image_seed(name, seed)] if name is not None else [seed + b for b in range(len(x))]
        out = [Perception(APM(after), rec) for _, after, rec in
               perceive_images(self.module, x, seeds, recipe, progress)]
        return out if isinstance(image, torch.Tensor) and image.ndim == 4 else out[0]

    def save(self, path: str | Path) -> Path:
        """Write this student as a checkpoint file (weights only) that every ``apm`` tool and
        ``from_pretrained`` load."""
        from apm.checkpoints import write_student

        write_student(self.module, path)
        return Path(path)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write this student as a folder: ``config.json`` (settings, the teacher by registered name,
        arguments and weights' source, the levels) and ``model.safetensors`` (weights and level
        statistics; no pickle). ``APM.from_pretrained(folder)`` and every ``apm`` tool load it."""
        from apm.checkpoints import save_pretrained

        return save_pretrained(self.module, folder)
