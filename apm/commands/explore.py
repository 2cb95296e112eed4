"""``apm explore``: one self-contained HTML page per run, in which a person clicks a pixel of a
photograph and sees the island holding it at every level, teacher beside student (and the
student fitted to the photograph, and the annotators' regions), with the parse-tree path. The
work is done by ``apm.explore``."""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

from apm.commands.common import IMAGES_HELP, parser, recipe_from_args, route_args, student_args, student_from_args
from apm.errors import ConfigError
from apm.precision import pick_device
from apm.students.base import RGB
from teachers.base import select_levels

DEFAULT_KS = [2, 4, 6, 8, 12]


def build_parser() -> argparse.ArgumentParser:
    p = parser("explore", "Write one self-contained HTML page (no server, no network: open it from "
               "disk, or log it to wandb as HTML) where a click on a pixel of a photograph highlights "
               "the k-means island holding it at every level, teacher beside student, with each "
               "island's size, the student's agreement with the teacher (IoU of the two islands, ARI "
               "of the level) and the path of islands from the lowest level to the highest (the "
               "parse tree); k, opacity and the photograph are chosen on the page. With --gt, the "
               "annotators' regions too and each level's scores against them (as apm segment).")
    student_args(p, "a trained student (checkpoint of 'apm fit' or 'apm perceive')",
                 "without --ckpt: LightningCLI config(s) naming the teacher (teacher only, or a fresh "
                 "student with --perceive); with --ckpt: settings the checkpoint must match")
    p.add_argument("--images", nargs="+", required=True, help=IMAGES_HELP)
    p.add_argument("--out", required=True, help="the HTML file to write")
    p.add_argument("--gt", default=None,
                   help="folder of ground truth: <name>.mat (BSDS), <name>/*.png or <name>.png, cropped "
                   "as the image is; photographs without any are shown without")
    p.add_argument("--levels", nargs="+", default=None,
                   help="levels by name or index, lowest first; default every teacher level but rgb")
    p.add_argument("--k", nargs="+", type=int, default=DEFAULT_KS, help="k-means cluster counts offered")
    p.add_argument("--initial-k", type=int, default=None, help="the k the page opens with (one of --k); "
                   "default the middle one")
    p.add_argument("--perceive", action="store_true", help="also fit a copy of the student to each photograph")
    p.add_argument("--max-steps", type=int, default=500, help="fitting: stop after this many steps")
    p.add_argument("--target-r2", type=float, default=0.9, help="fitting: stop at this mean R^2 over the levels")
    route_args(p)
    p.set_defaults(init=None, lr=None, queries=None)
    p.add_argument("--upsample", type=int, default=1,
                   help="> 1: the students' islands from their fields queried at this many times each "
                   "level's grid (finer than the teacher's, which stays on its grid)")
    p.add_argument("--n-init", type=int, default=3, help="k-means++ starts per k-means")
    p.add_argument("--seed", type=int, default=0, help="seed of k-means and of the fitting")
    p.add_argument("--title", default=None, help="the page's title; default names the teacher")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, or auto")
    return p


def check_inputs(a: argparse.Namespace) -> tuple[list[int], int]:
    """The checks that need no model: k, the images named, the ground-truth folder, the output;
    returns the sorted ks and the initial k. ConfigError naming the setting."""
    from apm.data import skimage_names

    ks = sorted(set(a.k))
    if a.upsample < 1:
        raise ConfigError(f"Setting '--upsample' {a.upsample}: give 1 (each level's grid) or more.")
    if ks[0] < 1:
        raise ConfigError(f"Setting '--k' {a.k}: cluster counts must be 1 or more (e.g. --k 2 4 6 8 12).")
    initial = ks[len(ks) // 2] if a.initial_k is None else a.initial_k
    if initial not in ks:
        raise ConfigError(f"Setting '--initial-k' {a.initial_k}: the page opens at one of the k it holds "
                          f"(--k {' '.join(map(str, ks))}); add it to --k or choose one of them.")
    for spec in a.images:
        if spec.startswith("skimage:"):
            skimage_names(spec, "--images")
        elif not Path(spec).exists():
            raise ConfigError(f"Setting '--images': {spec!r} does not exist. Give image files, folders of "
                              f"images, or skimage:NAME for an embedded photograph.")
    if a.gt is not None and not Path(a.gt).is_dir():
        raise ConfigError(f"Setting '--gt': {a.gt!r} is not a folder of ground truth (<name>.mat, "
                          f"<name>/*.png or <name>.png).")
    if Path(a.out).is_dir():
        raise ConfigError(f"Setting '--out': {a.out!r} is a folder; give the HTML file to write (e.g. explore.html).")
    return ks, initial


def plan_of(a: argparse.Namespace, module, ks: list[int]):
    """The ``ExplorePlan`` of the arguments; ConfigError for a level the teacher lacks or a k above
    the cells of a level's grid."""
    from apm.explore import ExplorePlan

    names = [l.name for l in module.levels]
    levels = (select_levels(names, a.levels, "--levels") if a.levels
              else [i for i, n in enumerate(names) if n != RGB])
    cells = min(module.levels[i].grid[0] * module.levels[i].grid[1] for i in levels)
    if ks[-1] > cells:
        raise ConfigError(f"Setting '--k': k {ks[-1]} is more islands than the {cells} cells of the "
                          f"coarsest level shown; choose k up to {cells}.")
    trained = bool(module.standardizer.ready)
    recipe = None
    if a.perceive:
        a.init = "trained" if trained else "fresh"
        recipe = recipe_from_args(a, "ours", target_r2=a.target_r2, max_steps=a.max_steps,
                                  levels=[names[i] for i in levels])
    return ExplorePlan(levels=levels, ks=ks, seed=a.seed, n_init=a.n_init, student=trained, recipe=recipe,
                       upsample=a.upsample)


def main(argv: list[str]) -> int:
    """``apm explore``: writes --out and prints its size."""
    from apm.explore import photo_entry, write_page
    from apm.segment import find_truth, load_photos, match_truth

    a = build_parser().parse_args(argv)
    ks, initial = check_inputs(a)
    device = pick_device(a.device)
    module = student_from_args(a, "explore", "a teacher alone", device)
    plan = plan_of(a, module, ks)
    if not plan.student and plan.recipe is None:
        print("no trained student (--config alone): the page shows the teacher's islands; --perceive "
              "adds a student fitted to each photograph")
    start = time.perf_counter()
    size = int(module.hparams.image_size)
    photos, skipped = load_photos(a.images, size)
    if not photos:
        raise ConfigError(f"Setting '--images': no readable image among {a.images} (see the warnings).")
    truths = {}
    if a.gt is not None:  # ground truth is optional per photograph: only a bad file is skipped
        found = find_truth(a.gt)
        some = [(n, hw) for n, _, hw in photos if n in found]
        truths, bad_truth = match_truth([n for n, _ in some], [hw for _, hw in some], a.gt, size)
        skipped += bad_truth
        if len(some) < len(photos):
            print(f"no ground truth in {a.gt} for {', '.join(n for n, _, _ in photos if n not in found)}")
    entries = []
    for i, (name, image, _) in enumerate(photos, 1):
        entries.append(photo_entry(module, name, image, plan, truths.get(name)))
        print(f"[{i}/{len(photos)}] {name}: {entries[-1]['seconds']:.1f} s", flush=True)
    names = [module.levels[i].name for i in plan.levels]
    teacher = str(module.hparams.teacher)
    weights = getattr(module.teacher, "weights_source", None)
    doc = {"title": a.title or f"apm explore: {teacher}", "size": size, "levels": names, "ks": ks,
           "k": initial, "sources": list(entries[0]["maps"]), "photos": entries,
           "note": f"Teacher {teacher}" + (f" ({weights})" if weights else "") + ".",
           "settings": {"ckpt": a.ckpt, "config": a.config, "seed": a.seed, "n_init": a.n_init,
                        "perceive": a.perceive, "upsample": a.upsample, "image_size": size}}
    path = write_page(doc, a.out)
    if skipped:
        warnings.warn(f"{len(skipped)} input(s) skipped (named above); {len(entries)} photograph(s) shown.",
                      stacklevel=1)
    print(f"wrote {path}: {len(entries)} photograph(s), {len(names)} levels, k {ks}, "
          f"{path.stat().st_size / 1e6:.2f} MB, {time.perf_counter() - start:.1f} s")
    return 0
