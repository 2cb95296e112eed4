"""``apm eval``: fidelity and island agreement per level, as a table and a JSON file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from tqdm import tqdm

from apm.analysis import format_table, island_scores, summarize
from apm.commands.common import IMAGES_HELP, parser
from apm.errors import ConfigError
from apm.offgrid import offgrid_scores
from apm.cli import load_student
from apm.data import load_images
from apm.precision import pick_device
from teachers.base import select_levels


def add_offgrid(per_image: dict[str, dict[str, list[float]]], scores: dict[str, dict[str, list[float]]]) -> None:
    """``apm.offgrid.offgrid_scores`` of a batch added to the per-image table as ``r2_offgrid_*``."""
    for name, ms in scores.items():
        for m, v in ms.items():
            per_image[name].setdefault(f"r2_offgrid_{m}", []).extend(v)


def main(argv: list[str]) -> int:
    """``apm eval``: fidelity and island agreement per level, as a table and a JSON file."""
    p = parser("eval", "Per level: mean cosine, centred cosine, R^2 (teacher's scale), MSE "
                "(standardized), and island agreement (k-means on teacher and on student features, "
                "ARI and NMI between the label maps) with its chance baseline (ari_control, "
                "nmi_control: each image's student against the next image's teacher, or with one "
                "image against its teacher flipped left-right); means over images, then over levels.")
    p.add_argument("--ckpt", required=True, help="checkpoint written by 'apm fit'")
    p.add_argument("--images", nargs="+", required=True, help=IMAGES_HELP)
    p.add_argument("--json", required=True, help="output JSON file")
    p.add_argument("--k", type=int, default=8, help="k-means clusters")
    p.add_argument("--levels", nargs="+", default=None, help="levels by name or index; default all")
    p.add_argument("--seed", type=int, default=0, help="k-means seed")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, or auto")
    p.add_argument("--offgrid", action="store_true",
                   help="also R^2 between the teacher's cells: against the teacher run on each image "
                   "moved by 4 and 11 px, the student queried there beside the nearest cell, bilinear "
                   "from one pass, bilinear from --passes lattice passes, and the teacher's own "
                   "consistency (r2_offgrid_*; docs/field.md)")
    p.add_argument("--passes", type=int, default=4,
                   help="with --offgrid: teacher passes of the bilinear_k baseline (a square; default 4)")
    a = p.parse_args(argv)
    if a.passes < 1 or round(a.passes ** 0.5) ** 2 != a.passes:
        raise ConfigError(f"Setting '--passes': {a.passes}; use a square number of teacher passes (1, 4, 9, 16).")
    if a.k < 2:
        raise ConfigError(f"Setting '--k': {a.k} clusters cannot disagree; use 2 or more (default 8).")
    module = load_student(a.ckpt, device=pick_device(a.device))
    images = load_images(a.images, module.hparams.image_size, skip_bad=True)
    levels = select_levels(module.levels, a.levels, "--levels")
    per_image: dict[str, dict[str, list[float]]] = {}
    count = len(images)
    bar = tqdm(total=count, desc="eval", unit="image", dynamic_ncols=True)
    for start in range(0, count, a.batch_size):
        end = min(start + a.batch_size, count)
        batch = torch.stack([img for _, img in images[start:end]])
        # the control of image i is image (i + 1) mod count: a batch's last needs the next batch's first
        following = None if end - start == count else images[end % count][1]
        for name, ms in island_scores(module, batch, levels, a.k, a.seed, following).items():
            for m, v in ms.items():
                per_image.setdefault(name, {}).setdefault(m, []).extend(v)
        if a.offgrid:
            add_offgrid(per_image, offgrid_scores(module, batch.to(module.device), levels, a.passes))
        bar.update(end - start)
    bar.close()
    summary = summarize(per_image)
    control = "the teacher of the next image" if count > 1 else "the teacher of the image flipped left-right"
    summary.update(images=[n for n, _ in images], ckpt=str(a.ckpt), k=a.k, control=control,
                   teacher_weights=module.teacher.weights_source)
    print(format_table(summary))
    print(f"teacher weights: {module.teacher.weights_source or 'random or unrecorded (see the checkpoint)'}")
    print(f"control (ari_control, nmi_control): each image's student islands against {control}")
    bad = [f"{n}.{m}" for n, v in summary["levels"].items() for m, x in v.items() if not math.isfinite(x)]
    if bad:
        print(f"warning: non-finite values: {', '.join(bad)}")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {a.json}")
    return 0
