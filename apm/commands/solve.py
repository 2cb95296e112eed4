"""``apm solve``: distil a field student in closed form (``apm.field.solve_field``)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from apm.checkpoints import write_student
from apm.commands.common import IMAGES_HELP, parser, student_args, student_from_args
from apm.data import read_images
from apm.errors import ConfigError
from apm.field import HEADS, solve_field
from apm.precision import pick_device


def build_parser() -> argparse.ArgumentParser:
    p = parser("solve", "Distil a student in closed form, on the CPU in minutes: keep its body as it is "
               "(fresh and random with --config, e.g. configs/field.yaml) and set every level's head to "
               "a ridge regression pooled over the photographs: by default of what the field route "
               "uses, the teacher's detail between the cells of --passes passes moved by sub-patch "
               "offsets (its features at --extra passes moved off that lattice, minus their bilinear "
               "interpolation from it) on the same of the student's activations. Writes OUT (a "
               "checkpoint every apm tool loads; the start of 'apm perceive --field'). See docs/field.md.")
    student_args(p, "a student whose body to keep (its heads and statistics are replaced)",
                 "LightningCLI config(s) of teacher and student (e.g. configs/apm.yaml configs/field.yaml)")
    p.add_argument("--images", nargs="+", required=True, help=IMAGES_HELP)
    p.add_argument("--out", required=True, help="the checkpoint to write (.ckpt)")
    p.add_argument("--passes", type=int, default=4, help="teacher passes per photograph (a square: 1, 4, 9)")
    p.add_argument("--ridge", type=float, default=1.0,
                   help="penalty: RIDGE x the mean squared norm of the centred activation rows")
    p.add_argument("--heads", choices=HEADS, default="detail", help="what the heads answer: 'detail', the "
                   "teacher between the lattice's cells minus its interpolation (what the field route "
                   "uses), or 'features', the teacher's features at the cells (alone they answer the "
                   "teacher; in the field they lose, docs/field.md)")
    p.add_argument("--extra", type=int, default=4, help="with --heads detail: passes per batch moved off "
                   "the lattice by random sub-patch offsets, where the detail is taken")
    p.add_argument("--seed", type=int, default=0, help="seed of those offsets")
    p.add_argument("--count", type=int, default=None, help="use the first COUNT photographs only")
    p.add_argument("--batch-size", type=int, default=4, help="photographs per teacher batch")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, or auto")
    return p


def main(argv: list[str]) -> int:
    """``apm solve``: distil a field student in closed form."""
    a = build_parser().parse_args(argv)
    if not a.ridge > 0:
        raise ConfigError(f"Setting '--ridge': {a.ridge}; use a positive penalty (default 1).")
    if a.heads == "detail" and a.extra < 1:
        raise ConfigError(f"Setting '--extra': {a.extra}; use 1 or more passes off the lattice (default 4).")
    if a.passes < 1 or round(a.passes ** 0.5) ** 2 != a.passes:
        raise ConfigError(f"Setting '--passes': {a.passes}; use a square number (1, 4, 9, 16).")
    module = student_from_args(a, "solve", "a fresh student of that config", pick_device(a.device)).eval()
    photos = read_images(a.images, module.hparams.image_size, skip_bad=True)[: a.count]
    start = time.perf_counter()
    with tqdm(total=len(photos), desc="solving", unit="photo") as bar:
        batches = (torch.stack([p.image for p in photos[i : i + a.batch_size]])
                   for i in range(0, len(photos), max(1, a.batch_size)))
        seen = solve_field(module, batches, a.passes, a.ridge, progress=bar.update, heads=a.heads, extra=a.extra,
                           seed=a.seed)
    seconds = time.perf_counter() - start
    write_student(module, a.out, extra={"solve": {"photographs": seen, "passes": a.passes, "ridge": a.ridge,
                                                  "heads": a.heads, "extra": a.extra if a.heads == "detail" else 0,
                                                  "seconds": round(seconds, 1)}})
    off = f" (+ {a.extra} off the lattice per batch, heads: detail)" if a.heads == "detail" else " (heads: features)"
    print(f"solved the heads of {len(module.levels)} levels on {seen} photographs x {a.passes} passes{off} in "
          f"{seconds:.0f} s -> {Path(a.out).resolve()}")
    return 0
