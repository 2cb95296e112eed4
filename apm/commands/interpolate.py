"""``apm interpolate``: the student's islands along a line between two trigger columns."""

from __future__ import annotations

from apm.analysis import interpolation_strip
from apm.commands.common import embedding_args, parser
from apm.errors import ConfigError
from apm.cli import load_student
from apm.data import load_images
from apm.precision import pick_device
from teachers.base import select_levels


def main(argv: list[str]) -> int:
    """``apm interpolate``: the student's islands along a line between two trigger columns."""
    p = parser("interpolate", "Interpolate the trigger columns of two images and render the "
                "student's islands and RGB level at each step (the percept is a field): a strip PNG "
                "with a row per level, plus a GIF beside it. One embedding per level is shared by "
                "all steps, so colours are comparable across columns.")
    p.add_argument("--ckpt", required=True, help="checkpoint written by 'apm fit'")
    p.add_argument("--a", required=True, help="first image (file or skimage:NAME)")
    p.add_argument("--b", required=True, help="second image (file or skimage:NAME)")
    p.add_argument("--steps", type=int, default=8, help="interpolation steps, ends included")
    p.add_argument("--out", required=True, help="output PNG; the GIF is written beside it")
    p.add_argument("--display", type=int, default=96, help="pixels per panel")
    p.add_argument("--no-gif", action="store_true", help="skip the GIF")
    embedding_args(p, method="pca")
    a = p.parse_args(argv)
    if a.steps < 2:
        raise ConfigError(f"Setting '--steps': {a.steps}; an interpolation needs at least 2 (the ends).")
    module = load_student(a.ckpt, device=pick_device(a.device))
    (_, img_a), = load_images([a.a], module.hparams.image_size, "--a")[:1]
    (_, img_b), = load_images([a.b], module.hparams.image_size, "--b")[:1]
    levels = select_levels(module.levels, a.levels, "--levels")
    for path in interpolation_strip(module, img_a, img_b, a.steps, a.out, levels, a.method,
                                    a.perplexity, a.seed, a.display, gif=not a.no_gif):
        print(path)
    return 0
