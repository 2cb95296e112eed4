"""The island commands: ``apm islands``, ``apm eval`` and ``apm interpolate``.

Each ``*_main`` takes the argument list after the subcommand name (see ``apm.cli.TOOLS``), parses
it, prints and returns the exit status; the work is done by ``apm.analysis``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from apm.analysis import (format_table, interpolation_strip, island_figures, island_scores,
                          load_images, load_trained_module, pick_device, resolve_levels,
                          summarize, teacher_figures, teacher_from_config)
from apm.errors import ConfigError


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"apm {prog}", description=description,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def _embedding_args(p: argparse.ArgumentParser, method: str = "tsne") -> None:
    p.add_argument("--levels", nargs="+", default=None,
                   help="levels to show, by name (block1, rgb, ...) or index; default all")
    p.add_argument("--method", choices=("tsne", "pca"), default=method,
                   help="embedding of features into RGB: joint t-SNE, or the first 3 principal components")
    p.add_argument("--perplexity", type=float, default=30.0, help="t-SNE perplexity")
    p.add_argument("--seed", type=int, default=0, help="seed of t-SNE, PCA and k-means")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, or auto")


def islands_main(argv: list[str]) -> int:
    """``apm islands``: island figures per image, a row per level."""
    p = _parser("islands", "Island figures: for each image a PNG with a row per level and columns "
                "input | teacher islands | student islands. Teacher and student features of one "
                "level are embedded together by t-SNE into 3 components shown as RGB, so one colour "
                "is one place in one embedding. Without --ckpt, --config gives a teacher alone.")
    p.add_argument("--ckpt", help="checkpoint written by 'apm fit'")
    p.add_argument("--config", action="append", default=None,
                   help="without --ckpt: LightningCLI config(s) naming the teacher (repeat to layer)")
    p.add_argument("--images", nargs="+", required=True,
                   help="image files, folders, or skimage:NAME[,NAME...] (embedded photographs)")
    p.add_argument("--out", required=True, help="output folder; one <image>.png per image")
    p.add_argument("--k", type=int, default=8, help="k-means clusters for the ARI in the row labels")
    p.add_argument("--max-iter", type=int, default=1000, help="t-SNE iterations")
    p.add_argument("--display", type=int, default=192, help="pixels per panel")
    _embedding_args(p)
    a = p.parse_args(argv)
    device = pick_device(a.device)
    if a.ckpt:
        module = load_trained_module(a.ckpt, device)
        images = load_images(a.images, module.hparams.image_size)
        levels = resolve_levels([l.name for l in module.levels], a.levels)
        paths = []
        for name, img in images:  # one at a time: t-SNE dominates and memory stays flat
            paths += island_figures(module, img[None], [name], a.out, levels, a.method, a.perplexity,
                                    a.seed, a.k, a.max_iter, a.display)
    elif a.config:
        teacher, size = teacher_from_config(a.config, device)
        images = load_images(a.images, size)
        levels = resolve_levels([l.name for l in teacher.levels], a.levels)
        paths = []
        for name, img in images:
            paths += teacher_figures(teacher, img[None], [name], a.out, levels, a.method,
                                     a.perplexity, a.seed, a.max_iter, a.display)
    else:
        raise ConfigError("apm islands needs --ckpt (teacher and student) or --config (teacher only, "
                          "e.g. --config configs/apm.yaml).")
    for path in paths:
        print(path)
    return 0


def eval_main(argv: list[str]) -> int:
    """``apm eval``: fidelity and island agreement per level, as a table and a JSON file."""
    p = _parser("eval", "Per level: mean cosine, centred cosine, R^2 (teacher's scale), MSE "
                "(standardized), and island agreement (k-means on teacher and on student features, "
                "ARI and NMI between the label maps) with its chance baseline (ari_control, "
                "nmi_control: each image's student against the next image's teacher, or with one "
                "image against its teacher flipped left-right); means over images, then over levels.")
    p.add_argument("--ckpt", required=True, help="checkpoint written by 'apm fit'")
    p.add_argument("--images", nargs="+", required=True,
                   help="image files, folders, or skimage:NAME[,NAME...] (embedded photographs)")
    p.add_argument("--json", required=True, help="output JSON file")
    p.add_argument("--k", type=int, default=8, help="k-means clusters")
    p.add_argument("--levels", nargs="+", default=None, help="levels by name or index; default all")
    p.add_argument("--seed", type=int, default=0, help="k-means seed")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, or auto")
    a = p.parse_args(argv)
    if a.k < 2:
        raise ConfigError(f"Setting '--k': {a.k} clusters cannot disagree; use 2 or more (default 8).")
    module = load_trained_module(a.ckpt, pick_device(a.device))
    images = load_images(a.images, module.hparams.image_size)
    levels = resolve_levels([l.name for l in module.levels], a.levels)
    per_image: dict[str, dict[str, list[float]]] = {}
    count = len(images)
    for start in range(0, count, a.batch_size):
        end = min(start + a.batch_size, count)
        batch = torch.stack([img for _, img in images[start:end]])
        # the control of image i is image (i + 1) mod count: a batch's last needs the next batch's first
        following = None if end - start == count else images[end % count][1]
        for name, ms in island_scores(module, batch, levels, a.k, a.seed, following).items():
            for m, v in ms.items():
                per_image.setdefault(name, {}).setdefault(m, []).extend(v)
    summary = summarize(per_image)
    control = "the teacher of the next image" if count > 1 else "the teacher of the image flipped left-right"
    summary.update(images=[n for n, _ in images], ckpt=str(a.ckpt), k=a.k, control=control)
    print(format_table(summary))
    print(f"control (ari_control, nmi_control): each image's student islands against {control}")
    bad = [f"{n}.{m}" for n, v in summary["levels"].items() for m, x in v.items() if not math.isfinite(x)]
    if bad:
        print(f"warning: non-finite values: {', '.join(bad)}")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {a.json}")
    return 0


def interpolate_main(argv: list[str]) -> int:
    """``apm interpolate``: the student's islands along a line between two trigger columns."""
    p = _parser("interpolate", "Interpolate the trigger columns of two images and render the "
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
    _embedding_args(p, method="pca")
    a = p.parse_args(argv)
    if a.steps < 2:
        raise ConfigError(f"Setting '--steps': {a.steps}; an interpolation needs at least 2 (the ends).")
    module = load_trained_module(a.ckpt, pick_device(a.device))
    (_, img_a), = load_images([a.a], module.hparams.image_size, "--a")[:1]
    (_, img_b), = load_images([a.b], module.hparams.image_size, "--b")[:1]
    levels = resolve_levels([l.name for l in module.levels], a.levels)
    for path in interpolation_strip(module, img_a, img_b, a.steps, a.out, levels, a.method,
                                    a.perplexity, a.seed, a.display, gif=not a.no_gif):
        print(path)
    return 0
