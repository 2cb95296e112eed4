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

import torch

from apm import segment
from apm.commands.common import student_from_args
from apm.errors import ConfigError
from apm.loading import pick_device
from apm.student import RGB
from teachers.base import select_levels


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
    p.add_argument("--json", help="output JSON file")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, or auto")
    return p


def _module(a: argparse.Namespace, device: torch.device):
    return student_from_args(a, "segment", "a teacher alone", device)


def _plan(a: argparse.Namespace, module) -> segment.Plan:
    from apm.perceive import FitRecipe

    if min(a.k) < 1 or min(a.tree_k) < 1:
        raise ConfigError(f"Settings '--k' {a.k} and '--tree-k' {a.tree_k}: cluster counts must be 1 or more.")
    names = [l.name for l in module.levels]
    levels = select_levels(names, a.levels, "--levels") if a.levels else [i for i, n in enumerate(names) if n != RGB]
    trained = bool(module.standardizer.ready)
    recipe = (FitRecipe(init="trained" if trained else "fresh", target_r2=a.target_r2, max_steps=a.max_steps,
                        levels=[names[i] for i in levels]) if a.perceive else None)
    fine = select_levels(names, a.upsample_levels, "--upsample-levels") if a.upsample_levels else levels[-1:]
    return segment.Plan(levels=levels, ks=sorted(set(a.k)), seed=a.seed, n_init=a.n_init, student=trained,
                        recipe=recipe, fine=a.upsample, fine_levels=fine if a.upsample > 1 else [],
                        tree_k=tuple(a.tree_k), reseed=a.reseed)


def _tree_levels(a: argparse.Namespace, module, plan: segment.Plan) -> list[str]:
    """The levels of the parse trees, lowest first: --tree-levels, or 4 spread over the scored
    levels; ConfigError (before any work) for one that is not scored."""
    names = [module.levels[i].name for i in plan.levels]
    if a.tree_levels:
        wanted = [module.levels[i].name for i in select_levels(module.levels, a.tree_levels, "--tree-levels")]
    else:
        wanted = list(dict.fromkeys(names[round(j * (len(names) - 1) / 3)] for j in range(4)))
    if set(wanted) - set(names):
        raise ConfigError(f"Setting '--tree-levels': {sorted(set(wanted) - set(names))} are not among the "
                          f"scored levels ({', '.join(names)}); add them to --levels.")
    return wanted


def _trees(a: argparse.Namespace, wanted: list[str], plan: segment.Plan, photos: dict,
           results: list[dict]) -> list[str]:
    """Parse-tree figures (teacher and every scored student) of the first --tree-images images."""
    lo, up = plan.tree_k
    have = sorted(set(plan.ks) | {lo, up})  # the k-means maps kept: k from LOWER (lowest) to UPPER (top)
    ks = [min(have, key=lambda k: abs(k - (lo + (up - lo) * j / max(1, len(wanted) - 1))))
          for j in range(len(wanted))]
    paths = []
    for r in results[: a.tree_images]:
        for source, lv in r["maps"].items():
            if any(n not in lv for n in wanted):
                continue
            maps = [lv[n][k] for n, k in zip(wanted, ks)]
            path = Path(a.figures) / f"{r['name']}_tree_{source}.png"
            paths.append(str(segment.parse_tree_figure(photos[r["name"]], wanted[::-1], maps[::-1], path,
                                                       f"{r['name']}: {source} islands, k {ks[::-1]} from the top")))
    return paths


def main(argv: list[str]) -> int:
    """``apm segment``: prints a table per level and writes --json."""
    a = _parser().parse_args(argv)
    device = pick_device(a.device)
    module = _module(a, device)
    plan = _plan(a, module)
    tree_levels = _tree_levels(a, module, plan) if a.figures else []
    start, cpu = time.perf_counter(), time.process_time()
    photos, bad_images = segment.load_photos(a.images, int(module.hparams.image_size))
    if not Path(a.gt).is_dir():
        raise ConfigError(f"Setting '--gt': {a.gt!r} is not a folder of ground truth (<name>.mat, "
                          f"<name>/*.png or <name>.png).")
    truths, bad_truth = segment.match_truth([n for n, _, _ in photos], [hw for _, _, hw in photos], a.gt,
                                            int(module.hparams.image_size))
    todo = [(n, img) for n, img, _ in photos if n in truths]
    if not todo:
        raise ConfigError(f"No image of {a.images} has usable ground truth in {a.gt} (see the warnings).")
    results = []
    for i, (name, img) in enumerate(todo, 1):
        results.append(segment.score_image(module, name, img, truths[name], plan))
        fit = results[-1]["fit"]
        note = f", R^2 {fit['r2_mean_before']:.3f} -> {fit['r2_mean_after']:.3f} in {fit['steps']} steps" if fit else ""
        print(f"[{i}/{len(todo)}] {name}: {results[-1]['seconds']:.1f} s{note}", flush=True)
    summary = segment.summarize(results)
    print(segment.format_tables(summary))
    figures = _trees(a, tree_levels, plan, dict(todo), results) if a.figures else []
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
