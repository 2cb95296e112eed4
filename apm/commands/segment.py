"""``apm segment``: k-means islands of each level scored against human segmentations with the
region measures of the BSDS500 benchmark (covering, PRI, VI, plus ARI; ODS and OIS), beside the
patch-colour and random baselines; the nesting of islands across adjacent levels; optionally the
islands of the student queried at a finer grid. The work is done by ``apm.segment``."""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

from apm import segment
from apm.commands.common import route_args, route_from_args, student_from_args
from apm.errors import ConfigError
from apm.perceive import ROUTE, FitRecipe
from apm.precision import pick_device


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="apm segment", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Score k-means islands of each level against human segmentations (BSDS500 region "
        "measures: segmentation covering, probabilistic Rand index, variation of information in bits, "
        "and the adjusted Rand index; ODS = one k for all images, OIS = the best k per image), for the "
        "teacher, the student and (--perceive) a student fitted to each image, beside k-means on patch "
        "colours and random Voronoi partitions. Also the nesting of each level's islands in the next "
        "level's. Ground truth: <gt>/<name>.mat (BSDS), <gt>/<name>/*.png (one label map per "
        "annotator) or <gt>/<name>.png, cropped as the image is.")
    p.add_argument("--ckpt", help="a trained student (checkpoint of 'apm fit' or 'apm perceive')")
    p.add_argument("--config", action="append", default=None,
                   help="without --ckpt: LightningCLI config(s) naming the teacher (teacher only, or a "
                   "fresh student with --perceive); with --ckpt: settings the checkpoint must match")
    p.add_argument("--images", nargs="+", required=True, help="image files, folders, or skimage:NAME[,NAME...]")
    p.add_argument("--gt", required=True, help="folder of ground truth: <name>.mat, <name>/*.png or <name>.png")
    p.add_argument("--levels", nargs="+", default=None, help="levels by name or index; default every teacher level")
    p.add_argument("--k", nargs="+", type=int, default=[2, 3, 4, 6, 8, 12], help="k-means cluster counts")
    p.add_argument("--perceive", action="store_true", help="fit a copy of the student to each image first")
    p.add_argument("--max-steps", type=int, default=500, help="fitting: stop after this many steps")
    p.add_argument("--target-r2", type=float, default=0.9, help="fitting: stop at this mean R^2 over the levels")
    route_args(p)
    p.add_argument("--upsample", type=int, default=0,
                   help="> 1: also islands at this many times the grid: the teacher's grid upsampled "
                   "bilinearly against the (fitted) student queried there (k-means with 3 starts there)")
    p.add_argument("--upsample-levels", nargs="+", default=None, help="levels of --upsample; default the last")
    p.add_argument("--tree-k", nargs=2, type=int, default=[8, 4], metavar=("LOWER", "UPPER"),
                   help="k of the lower and of the upper level in the nesting of adjacent levels")
    p.add_argument("--figures", help="folder for parse-tree figures of the first --tree-images images")
    p.add_argument("--tree-images", type=int, default=1, help="images drawn as parse trees with --figures")
    p.add_argument("--tree-levels", nargs="+", default=None,
                   help="levels of the parse tree, lowest first; default 4 spread over --levels")
    p.add_argument("--reseed", action="store_true",
                   help="also the teacher's islands with k-means seeded --seed + 1 (teacher_reseeded): "
                   "how much the measures move with the k-means seed alone")
    p.add_argument("--n-init", type=int, default=3, help="k-means++ starts per k-means")
    p.add_argument("--seed", type=int, default=0, help="seed of k-means, random partitions and fitting")
    p.add_argument("--resolution", choices=["grid", "full"], default="grid",
                   help="grid: 224-px-style centre crops, islands on each level's grid; full: the whole "
                   "photograph at its aspect ratio, islands at its pixels (the teacher's grid upsampled "
                   "bilinearly, with --ckpt the student queried at every pixel, patch colours), scored on the uncropped "
                   "ground truth with the region and boundary measures, as the BSDS500 benchmark scores")
    p.add_argument("--ucm", help="with --resolution full: folder of gPb-owt-ucm maps (<name>.mat with 'ucm2', "
                   "e.g. BSDS500's ucm2/val), scored beside the islands")
    p.add_argument("--thresholds", type=int, default=15,
                   help="with --resolution full: thresholds of each boundary strength map and of ucm2")
    p.add_argument("--no-boundaries", action="store_true",
                   help="with --resolution full: skip the boundary measure (its matchings are the slow part)")
    p.add_argument("--contours", action="store_true",
                   help="with --resolution full: also each source's contours, the boundaries where its "
                   "features turn fast (the gradient of its levels' features at every pixel), scored by "
                   "the boundary measure beside its islands' (rows <source>:contours)")
    p.add_argument("--json", help="output JSON file")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, or auto")
    return p


def _pointless(a: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    """ConfigError for flags set away from their defaults that do nothing in this combination."""
    full, grid = a.resolution == "full", a.resolution == "grid"
    unused = [(f, need) for f, need, on in (
        ("--upsample", "--resolution grid", grid),
        ("--figures", "--resolution grid", grid), ("--reseed", "--resolution grid", grid),
        ("--tree-k", "--resolution grid", grid), ("--ucm", "--resolution full", full),
        ("--thresholds", "--resolution full", full), ("--no-boundaries", "--resolution full", full),
        ("--contours", "--resolution full", full),
        ("--max-steps", "--perceive", a.perceive), ("--target-r2", "--perceive", a.perceive),
        *((f"--{k.replace('_', '-')}", "--perceive", a.perceive) for k in ROUTE),
        ("--upsample-levels", "--upsample 2 or more", a.upsample > 1),
        ("--tree-levels", "--figures", a.figures), ("--tree-images", "--figures", a.figures))
        if not on and getattr(a, f[2:].replace("-", "_")) != p.get_default(f[2:].replace("-", "_"))]
    if a.contours and a.no_boundaries:
        raise ConfigError("Settings '--contours' and '--no-boundaries': contours are scored by the boundary "
                          "measure; drop one of them.")
    if unused:
        raise ConfigError("Settings " + ", ".join(f"'{f}' (needs {need})" for f, need in unused)
                          + ": they do nothing without the setting they refine; add it or drop them.")


def main(argv: list[str]) -> int:
    """``apm segment``: prints a table per level and writes --json."""
    p = _parser()
    a = p.parse_args(argv)
    _pointless(a, p)
    device = pick_device(a.device)
    module = student_from_args(a, "segment", "a teacher alone", device)
    if a.resolution == "full":
        return _full(a, module)
    plan = segment.make_plan(module, a.levels, a.k, seed=a.seed, n_init=a.n_init, perceive=a.perceive,
                             max_steps=a.max_steps, target_r2=a.target_r2, upsample=a.upsample,
                             upsample_levels=a.upsample_levels, tree_k=a.tree_k, reseed=a.reseed,
                             route=route_from_args(a) if a.perceive else None)
    tree_levels = segment.tree_levels(module, plan, a.tree_levels) if a.figures else []
    start, cpu = time.perf_counter(), time.process_time()
    results, photos, bad_images, bad_truth = segment.run(module, a.images, a.gt, plan)
    summary = segment.summarize(results)
    print(segment.format_tables(summary))
    figures = segment.draw_trees(results, tree_levels, plan, photos, a.figures, a.tree_images) if a.figures else []
    skipped = bad_images + bad_truth
    if skipped:
        warnings.warn(f"{len(skipped)} input(s) skipped (named above): {len(bad_images)} image(s), "
                      f"{len(bad_truth)} ground truth; {len(results)} image(s) scored.", stacklevel=1)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"{len(results)} image(s) scored, {len(skipped)} skipped, {seconds:.1f} s ({cpu:.1f} CPU-s)")
    if a.json:
        doc = segment.to_json(summary, results, images=[r["name"] for r in results], skipped=skipped,
                              figures=figures, seconds=round(seconds, 2), cpu_seconds=round(cpu, 2), settings={
                                  "ckpt": a.ckpt, "config": a.config, "gt": a.gt, "k": plan.ks,
                                  "levels": [module.levels[i].name for i in plan.levels], "perceive": a.perceive,
                                  "grids": {module.levels[i].name: list(module.levels[i].grid) for i in plan.levels},
                                  "max_steps": a.max_steps, "target_r2": a.target_r2, "upsample": a.upsample,
                                  "tree_k": list(plan.tree_k), "n_init": plan.n_init, "seed": plan.seed,
                                  "fine_n_init": plan.fine_n_init, "reseed": plan.reseed,
                                  "image_size": int(module.hparams.image_size), "vi_units": "bits",
                                  "teacher_weights": getattr(module.teacher, "weights_source", None)})
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {a.json}")
    for f in figures:
        print(f)
    return 0


def _full(a: argparse.Namespace, module) -> int:
    """``apm segment --resolution full``: prints the tables and writes --json."""
    from apm.segment import full

    plan = segment.make_plan(module, a.levels, a.k, seed=a.seed, n_init=a.n_init)
    trained = bool(module.standardizer.ready)
    features_at, name = (full.student_query(module) if trained else None), "student_queried"
    passes = (1,)
    if a.perceive:
        recipe = FitRecipe(init="trained" if trained else "fresh", target_r2=a.target_r2, max_steps=a.max_steps,
                           **route_from_args(a))
        if recipe.field:  # at the photograph's own size, beside the teacher from the same passes
            features_at, name, passes = full.field_query(module, recipe.passes), "field", (1, recipe.passes)
        else:
            features_at, name = full.fitted_query(module, recipe), "student_fitted"
    fplan = full.FullPlan(levels=plan.levels, ks=plan.ks, seed=a.seed, n_init=a.n_init, thresholds=a.thresholds,
                          features_at=features_at, student_name=name, boundaries=not a.no_boundaries, contours=a.contours,
                          teacher_passes=passes)
    start, cpu = time.perf_counter(), time.process_time()
    results, skipped = full.run_full(module, a.images, a.gt, fplan, a.ucm)
    summary = full.summarize_full(results)
    print(full.format_full(summary))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"{len(results)} photograph(s) scored, {len(skipped)} skipped, {seconds:.1f} s ({cpu:.1f} CPU-s)")
    if a.json:
        per_image = [{k: v for k, v in r.items() if k != "boundary"} for r in results]
        doc = {**summary, "per_image": per_image, "skipped": skipped, "seconds": round(seconds, 2),
               "cpu_seconds": round(cpu, 2), "settings": {
                   "resolution": "full", "ckpt": a.ckpt, "config": a.config, "gt": a.gt, "ucm": a.ucm,
                   "perceive": a.perceive, **(route_from_args(a) if a.perceive else {}),
                   "k": plan.ks, "levels": [module.levels[i].name for i in plan.levels], "n_init": a.n_init,
                   "seed": a.seed, "thresholds": a.thresholds, "sample": fplan.sample, "vi_units": "bits",
                   "teacher_weights": getattr(module.teacher, "weights_source", None)}}
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {a.json}")
    return 0
