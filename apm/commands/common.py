"""What the commands share: their parser, the student options (--ckpt / --config) and the
embedding options of the figure commands."""

from __future__ import annotations

import argparse

from apm.errors import ConfigError
from apm.cli import load_student


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    from apm.flag_errors import Parser

    return Parser(prog=f"apm {prog}", description=description,
                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def student_args(p: argparse.ArgumentParser, ckpt_help: str, config_help: str,
                 required: bool = False) -> None:
    """--ckpt (a trained student) and --config (repeatable LightningCLI configs)."""
    p.add_argument("--ckpt", required=required, help=ckpt_help)
    if config_help:
        p.add_argument("--config", action="append", default=None, help=config_help)


def student_from_args(a: argparse.Namespace, command: str, fresh: str, device):
    """The student a command works on: --ckpt (checked against --config when both are given), or
    a fresh one of --config; ConfigError naming both options when neither is."""
    configs = getattr(a, "config", None)
    if not a.ckpt and not configs:
        raise ConfigError(f"apm {command} needs --ckpt (a trained student) or --config ({fresh}, e.g. "
                          f"--config configs/apm.yaml).")
    return load_student(a.ckpt, configs, device)


def route_args(p: argparse.ArgumentParser) -> None:
    """--moves, --solve-heads, --ridge, --resolve-every and --passes (``FitRecipe``'s route fields, with its
    defaults): which parameters a per-image fit moves, and the heads solved in closed form
    (docs/perceive.md, "Perceiving in a few steps")."""
    from apm.perceive import MOVES, FitRecipe

    p.add_argument("--moves", choices=list(MOVES), default=FitRecipe.moves,
                   help="the parameters the gradient steps move per image: all; heads (each level's "
                   "linear readout); code (the first layer's bias, a per-image shift of the column "
                   "term); code+heads; body (all but the heads). The others stay the start's")
    p.add_argument("--solve-heads", action="store_true",
                   help="first set every head to the ridge regression of the image's targets on the "
                   "student's last hidden activations at the scored cells: one closed-form least-squares "
                   "step. Its R^2 on those cells says little of the student (an untrained wide student "
                   "reaches 0.999); see docs/perceive.md")
    p.add_argument("--ridge", type=float, default=None,
                   help=f"with --solve-heads, its penalty lam = RIDGE x the mean squared norm of the "
                   f"centred activation rows (a sum over the hidden units: at width k, k times the "
                   f"mean squared centred activation); default {FitRecipe.ridge:g}")
    p.add_argument("--resolve-every", type=int, default=FitRecipe.resolve_every,
                   help="with --solve-heads, solve the heads again after every N gradient steps (0: "
                   "only first); 1 with --moves body is variable projection, the fastest route to "
                   "the full fit's islands (docs/perceive.md)")
    p.add_argument("--passes", type=int, default=FitRecipe.passes,
                   help="teacher passes per image: 1 fits the grid; 4 (or 9, 16) also fits the teacher "
                   "on the image moved by a lattice of sub-patch offsets, at the points where those "
                   "cells truly sit, so the student answers between the grid's cells (docs/field.md)")
    p.add_argument("--field", action=argparse.BooleanOptionalAction, default=None,
                   help="the field route: no gradient step; the trained student is kept and each level "
                   "gets a gain and the bilinear interpolation of what it missed at the cells of "
                   "--passes passes (4 unless given): the teacher at those cells, the pixels and the "
                   "passes between them, in about a second (docs/field.md). Default of apm perceive "
                   "from --ckpt when no gradient setting is given; --no-field: the gradient fit")


def recipe_from_args(a: argparse.Namespace, protocol: str, **kwargs):
    """The fitting recipe of a command's --protocol, --init, --lr, --queries and route options
    (``route_args``): ``init`` defaults to trained with --ckpt and fresh without (the official
    protocol is always fresh)."""
    from apm.perceive import FitRecipe

    init = a.init or (None if protocol == "official" else "trained" if a.ckpt else "fresh")
    if init == "trained" and not a.ckpt and protocol == "ours":
        raise ConfigError("Setting '--init trained' needs --ckpt, a trained student to start from; "
                          "with --config alone the student is fresh (--init fresh).")
    return FitRecipe(protocol=protocol, init=init, lr=a.lr, queries_per_image=a.queries, **route_from_args(a),
                     **kwargs)


def route_from_args(a: argparse.Namespace) -> dict:
    """``FitRecipe``'s route fields as a command's route options (``route_args``) set them: the one
    reading of those options by every command that fits (perceive, classify, segment)."""
    from apm.perceive import ROUTE

    if getattr(a, "ridge", None) is not None and not getattr(a, "solve_heads", False):
        raise ConfigError(f"Setting '--ridge {a.ridge:g}' is the penalty of --solve-heads and does nothing "
                          f"without it; add --solve-heads, or drop --ridge.")
    return {k: getattr(a, k) for k in ROUTE if getattr(a, k, None) is not None}


def embedding_args(p: argparse.ArgumentParser, method: str = "tsne") -> None:
    p.add_argument("--levels", nargs="+", default=None,
                   help="levels to show, by name (block1, rgb, ...) or index; default all")
    p.add_argument("--method", choices=("tsne", "pca"), default=method,
                   help="embedding of features into RGB: joint t-SNE, or the first 3 principal components")
    p.add_argument("--perplexity", type=float, default=30.0, help="t-SNE perplexity")
    p.add_argument("--seed", type=int, default=0, help="seed of t-SNE, PCA and k-means")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, or auto")


IMAGES_HELP = "image files, folders, or skimage:NAME[,NAME...] (embedded photographs)"
