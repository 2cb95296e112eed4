"""The benchmark run behind ``apm segment``: what is measured (``Plan``), every image scored
(``score_image``, ``run``), the summary over images (ODS/OIS), its tables and JSON, and the
parse-tree figures of the first images."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from apm.errors import ConfigError
from apm.segment.islands import (kmeans_maps, patch_colours, random_maps, score_maps, student_features,
                                 upsample_features)
from apm.segment.measures import HIGHER_IS_BETTER, MEASURES, ods_ois
from apm.segment.tree import nesting, parse_tree_figure
from apm.segment.truth import Truth, match_truth


@dataclass
class Plan:
    """What ``score_image`` measures.

    Args:
        levels: The module's level indices scored (and nested, in this order).
        ks: k-means cluster counts; ODS and OIS choose among them.
        seed: Seed of k-means, of the random partitions and of the fitting (``image_seed``).
        n_init: k-means++ starts per k-means on a level's grid.
        student: Score the module's own student (False for an untrained one).
        recipe: A ``FitRecipe``: fit a copy of the student to each image first (``fitted``).
        fine: > 1: also score islands at ``fine`` times the grid, the teacher's features upsampled
            bilinearly against the (fitted) student queried there, for ``fine_levels``, with
            ``fine_n_init`` k-means++ starts (fine**2 times the points: each start costs as much more).
        tree_k: (lower, upper): k of the lower and of the upper level of each nested pair.
        reseed: Also cluster the teacher's features with k-means seeded ``seed + 1``
            (``teacher_reseeded``): how far the measures move with k-means' seed alone.
    """

    levels: list[int]
    ks: list[int]
    seed: int = 0
    n_init: int = 3
    student: bool = True
    recipe: object | None = None
    fine: int = 0
    fine_levels: list[int] = field(default_factory=list)
    fine_n_init: int = 3
    tree_k: tuple[int, int] = (8, 4)
    reseed: bool = False


def load_photos(specs: Sequence[str], size: int) -> tuple[list[tuple[str, torch.Tensor, tuple[int, int]]], list[str]]:
    """(name, image (3, S, S) as ``apm.data.image_transform`` makes it, or the whole photograph
    (3, H, W) when ``size`` is 0, original (rows, columns)) for image files, folders and
    ``skimage:NAME``; a missing or unreadable one is named in a warning and skipped (returned second)."""
    from apm.data import find_images, image_transform, load_image, skimage_names, skimage_photo
    from apm.errors import UnreadableImageError
    from apm.skipping import SkipLog, failure_reason

    from torchvision.transforms.v2.functional import pil_to_tensor

    tf = image_transform(size) if size else (lambda p: pil_to_tensor(p).float() / 255)
    out, skipped, log = [], [], SkipLog()  # the one policy: each bad input named once, a count at the end
    for spec in specs:
        if spec.startswith("skimage:"):
            pils = [(n, skimage_photo(n)) for n in skimage_names(spec, "--images")]
        else:
            files = find_images(Path(spec)) if Path(spec).exists() else []
            if not files:
                why = "no image files in this folder" if Path(spec).is_dir() else "no such image file or folder"
                skipped.append(f"{spec}: {why}")
                log.record([(spec, why)])
            pils = []
            for f in files:
                try:
                    pils.append((f.stem, load_image(f)))
                except UnreadableImageError as e:
                    skipped.append(str(e))
                    log.record([(str(f), failure_reason(e, str(f)))])
        out += [(n, tf(p), (p.height, p.width)) for n, p in pils]
    log.summary(f"; {len(out)} image(s) loaded")
    return out, skipped


def image_features(module, name: str, image: torch.Tensor, plan: Plan):
    """Per source (teacher, student, fitted), features (h, w, d) of each planned level; the
    teacher's features of every level (``module.targets``); the fitted module (or None) and its
    fitting record."""
    from apm.perceive import perceive_images
    from apm.runlog import image_seed

    with torch.no_grad():
        targets = module.targets(image[None].to(module.device))
    feats = {"teacher": [targets[i][0].cpu() for i in plan.levels]}
    if plan.student:
        feats["student"] = [f[0].cpu() for f in module.predict_features(image[None].to(module.device), plan.levels)]
    fitted, record = None, None
    if plan.recipe is not None:
        ((_, fitted, record),) = perceive_images(module, image[None], [image_seed(name, plan.seed)],
                                                 plan.recipe, progress=False, features=targets)
        feats["fitted"] = [f[0].cpu() for f in fitted.predict_features(image[None].to(module.device), plan.levels)]
    return feats, targets, fitted, record


def nested_pairs(maps: dict[str, dict[int, np.ndarray]], tree_k: tuple[int, int]) -> dict[str, dict[str, float]]:
    """``nesting`` of each adjacent pair of levels ``lower>upper`` (``maps``: level name -> k ->
    map, in level order), the lower level's islands at k = tree_k[0], the upper's at tree_k[1];
    then, as the reference of what k alone does, each level in itself (``level>level``: its
    tree_k[0] islands inside its own tree_k[1] islands)."""
    names = list(maps)
    pairs = list(zip(names[:-1], names[1:])) + [(n, n) for n in names]
    return {f"{lo}>{up}": nesting(maps[lo][tree_k[0]], maps[up][tree_k[1]]) for lo, up in pairs}


def fine_scores(module, fitted, image: torch.Tensor, targets: Sequence[torch.Tensor], truth: Truth,
                plan: Plan) -> dict[str, dict]:
    """Islands at ``plan.fine`` times each fine level's grid, per level: ``teacher_bilinear`` (the
    teacher's features ``targets`` upsampled bilinearly), ``<student>_queried`` (the student's
    field queried there: the fitted one when fitting, else the module's) and, as a control,
    ``<student>_bilinear`` (that student's answers on the level's own grid, upsampled bilinearly)."""
    who, student = ("fitted", fitted) if fitted is not None else ("student", module if plan.student else None)
    out = {}
    for lvl in plan.fine_levels:
        grid = tuple(plan.fine * g for g in module.levels[lvl].grid)
        feats = {"teacher_bilinear": upsample_features(targets[lvl][0].cpu(), grid)}
        if student is not None:
            feats[f"{who}_queried"] = student_features(student, image, lvl, grid)
            own = student_features(student, image, lvl, module.levels[lvl].grid)
            feats[f"{who}_bilinear"] = upsample_features(own, grid)
        out[module.levels[lvl].name] = {s: score_maps(kmeans_maps(f, plan.ks, plan.seed, plan.fine_n_init), truth)
                                        for s, f in feats.items()}
    return out


def score_image(module, name: str, image: torch.Tensor, truth: Truth, plan: Plan) -> dict:
    """Everything measured on one image: per source, level and k the four measures (``scores``);
    the colour and random baselines; the nesting of adjacent levels; the any-resolution scores
    (``fine``); the fitting record; the k-means maps (``maps``, not for JSON); seconds."""
    from apm.runlog import image_seed

    start, cpu = time.perf_counter(), time.process_time()
    feats, targets, fitted, record = image_features(module, name, image, plan)
    fit_s = time.perf_counter() - start
    names = [module.levels[i].name for i in plan.levels]
    ks = sorted(set(plan.ks) | set(plan.tree_k))
    maps = {s: {n: kmeans_maps(f, ks, plan.seed, plan.n_init) for n, f in zip(names, fs)} for s, fs in feats.items()}
    if plan.reseed:
        maps["teacher_reseeded"] = {n: kmeans_maps(f, ks, plan.seed + 1, plan.n_init)
                                    for n, f in zip(names, feats["teacher"])}
    pick = lambda m: {k: m[k] for k in plan.ks}  # noqa: E731
    scores = {s: {n: score_maps(pick(m), truth) for n, m in lv.items()} for s, lv in maps.items()}
    patch = module.student.patch_size
    base = {"colour": score_maps(kmeans_maps(patch_colours(image, patch), plan.ks, plan.seed, plan.n_init), truth),
            "random": score_maps(random_maps(module.student.grid, plan.ks, image_seed(name, plan.seed)), truth)}
    nest = {s: nested_pairs(lv, plan.tree_k) for s, lv in maps.items()} if len(names) > 1 else {}
    fine = fine_scores(module, fitted, image, targets, truth, plan) if plan.fine > 1 and plan.fine_levels else {}
    return {"name": name, "scores": scores, "baselines": base, "nesting": nest, "fine": fine,
            "annotators": len(truth.maps), "weight": float(len(truth.maps) * truth.maps[0].size),
            "fit": record, "maps": maps, "fit_seconds": fit_s, "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu}


def summarize(results: Sequence[dict]) -> dict:
    """ODS/OIS over images per level and source, baseline, any-resolution level and source; the
    mean nesting per source and pair; the fitting summary."""
    first, w = results[0], [r.get("weight", 1.0) for r in results]
    out = {"levels": {n: {s: ods_ois([r["scores"][s][n] for r in results], w) for s in first["scores"]}
                      for n in next(iter(first["scores"].values()))},
           "baselines": {b: ods_ois([r["baselines"][b] for r in results], w) for b in first["baselines"]},
           "fine": {n: {s: ods_ois([r["fine"][n][s] for r in results], w) for s in v}
                    for n, v in first["fine"].items()},
           "nesting": {s: {p: {m: float(np.mean([r["nesting"][s][p][m] for r in results])) for m in v}
                           for p, v in pairs.items()} for s, pairs in first["nesting"].items()}}
    fits = [r["fit"] for r in results if r.get("fit")]
    if fits:
        out["fit"] = {"r2_mean_before": float(np.mean([f["r2_mean_before"] for f in fits])),
                      "r2_mean_after": float(np.mean([f["r2_mean_after"] for f in fits])),
                      "steps_median": float(np.median([f["steps"] for f in fits])),
                      "reached": sum(bool(f["reached"]) for f in fits), "images": len(fits)}
    return out


def format_tables(summary: dict) -> str:
    """The summary as text: which direction is better, a table per level (a row per source; ODS
    and OIS of each measure), the baselines, the any-resolution scores, the nesting of adjacent
    levels, and a hint when the unfitted student is no better than random cells."""
    head = "".join(f"{m + ' ODS (k) OIS':>22}" for m in MEASURES)
    cell = lambda v: f"{v['ods']:>10.3f} ({v['ods_k']:>2}) {v['ois']:.3f}"  # noqa: E731
    row = lambda label, v: f"  {label:<18}" + "".join(cell(v[m]) for m in MEASURES)  # noqa: E731
    better = ", ".join(m for m in MEASURES if HIGHER_IS_BETTER[m])
    lines = [f"{better}: higher is better; vi (bits): lower is better. ODS: one k for every image, "
             f"OIS: the best k per image, (k): the ODS k."]
    blocks = [(f"level {n}", v) for n, v in summary["levels"].items()]
    blocks += [("baselines (patch colours, random Voronoi)", summary["baselines"])]
    blocks += [(f"any resolution: level {n}", v) for n, v in summary.get("fine", {}).items()]
    for title, rows in blocks:
        lines += [title, f"  {'':<18}{head}"] + [row(s, v) for s, v in rows.items()]
    for s, pairs in summary.get("nesting", {}).items():
        lines.append(f"nesting of adjacent levels, then of each level in itself ({s}): H(upper|lower) nats "
                     f"(0: nested) / H(upper) / share (1: nested) / chance share")
        lines += [f"  {p:<20}{v['h_upper_given_lower']:>8.3f}{v['h_upper']:>8.3f}{v['share']:>8.3f}"
                  f"{v['share_chance']:>8.3f}" for p, v in pairs.items()]
    return "\n".join(lines + perceive_hint(summary))


def perceive_hint(summary: dict, margin: float = 0.02) -> list[str]:
    """A line advising ``--perceive`` when the unfitted student's covering (ODS) is within
    ``margin`` of random cells, or below them, on most levels and no fitted student was scored."""
    random = summary["baselines"].get("random", {}).get("covering", {}).get("ods")
    scored = [v["student"]["covering"]["ods"] for v in summary["levels"].values() if "student" in v]
    if random is None or not scored or any("fitted" in v for v in summary["levels"].values()):
        return []
    near = sum(c <= random + margin for c in scored)
    if 2 * near <= len(scored):
        return []
    return [f"hint: the unfitted student's islands score near or below random cells on {near} of {len(scored)} "
            f"levels (covering ODS {min(scored):.3f}-{max(scored):.3f}, random {random:.3f}): a distilled student "
            f"is a starting point; add --perceive to fit it to each image first."]


def to_json(summary: dict, results: Sequence[dict], **extra) -> dict:
    """The JSON document: the summary, per-image scores (per source, level and k; annotators and
    covering weight), nesting and fitting records, and ``extra`` (settings, skipped inputs, seconds)."""
    per_image = [{"name": r["name"], "annotators": r["annotators"], "weight": r["weight"],
                  "scores": r["scores"], "baselines": r["baselines"], "nesting": r["nesting"], "fine": r["fine"],
                  "seconds": round(r["seconds"], 3), "cpu_seconds": round(r["cpu_seconds"], 3),
                  "fit": {k: v for k, v in (r["fit"] or {}).items() if k != "curve"} or None}
                 for r in results]
    return {**summary, **extra, "per_image": per_image}


def make_plan(module, levels: Sequence[str] | None = None, ks: Sequence[int] = (2, 3, 4, 6, 8, 12), *,
              seed: int = 0, n_init: int = 3, perceive: bool = False, max_steps: int = 500,
              target_r2: float = 0.9, upsample: int = 0, upsample_levels: Sequence[str] | None = None,
              tree_k: Sequence[int] = (8, 4), reseed: bool = False, route: dict | None = None) -> Plan:
    """The ``Plan`` of a module's levels (by name or index; default every level but ``rgb``), with
    a fitting recipe when ``perceive`` (from the trained student, or a fresh one for a teacher
    alone; ``route``: ``FitRecipe``'s route fields, as the commands' route options give them);
    ConfigError for cluster counts below 1 or unknown levels."""
    from apm.perceive import FitRecipe
    from apm.students.base import RGB
    from teachers.base import select_levels

    if min(ks) < 1 or min(tree_k) < 1:
        raise ConfigError(f"Settings '--k' {list(ks)} and '--tree-k' {list(tree_k)}: cluster counts must be 1 or more.")
    names = [l.name for l in module.levels]
    chosen = select_levels(names, list(levels), "--levels") if levels else [i for i, n in enumerate(names) if n != RGB]
    trained = bool(module.standardizer.ready)
    recipe = (FitRecipe(init="trained" if trained else "fresh", target_r2=target_r2, max_steps=max_steps,
                        levels=[names[i] for i in chosen], **(route or {})) if perceive else None)
    fine = select_levels(names, list(upsample_levels), "--upsample-levels") if upsample_levels else chosen[-1:]
    return Plan(levels=chosen, ks=sorted(set(ks)), seed=seed, n_init=n_init, student=trained, recipe=recipe,
                fine=upsample, fine_levels=fine if upsample > 1 else [], tree_k=tuple(tree_k), reseed=reseed)


def tree_levels(module, plan: Plan, wanted: Sequence[str] | None = None) -> list[str]:
    """The levels of the parse trees, lowest first: ``wanted``, or 4 spread over the scored
    levels; ConfigError (before any work) for one that is not scored."""
    from teachers.base import select_levels

    names = [module.levels[i].name for i in plan.levels]
    if wanted:
        wanted = [module.levels[i].name for i in select_levels(module.levels, list(wanted), "--tree-levels")]
    else:
        wanted = list(dict.fromkeys(names[round(j * (len(names) - 1) / 3)] for j in range(4)))
    if set(wanted) - set(names):
        raise ConfigError(f"Setting '--tree-levels': {sorted(set(wanted) - set(names))} are not among the "
                          f"scored levels ({', '.join(names)}); add them to --levels.")
    return wanted


def draw_trees(results: Sequence[dict], wanted: list[str], plan: Plan, photos: dict, folder: str | Path,
               count: int = 1) -> list[str]:
    """Parse-tree figures (teacher and every scored student) of the first ``count`` results, k
    from the plan's lower tree k at the lowest wanted level to its upper k at the top."""
    lo, up = plan.tree_k
    have = sorted(set(plan.ks) | {lo, up})  # the k-means maps kept
    ks = [min(have, key=lambda k: abs(k - (lo + (up - lo) * j / max(1, len(wanted) - 1))))
          for j in range(len(wanted))]
    paths = []
    for r in results[:count]:
        for source, lv in r["maps"].items():
            if any(n not in lv for n in wanted):
                continue
            maps = [lv[n][k] for n, k in zip(wanted, ks)]
            path = Path(folder) / f"{r['name']}_tree_{source}.png"
            paths.append(str(parse_tree_figure(photos[r["name"]], wanted[::-1], maps[::-1], path,
                                               f"{r['name']}: {source} islands, k {ks[::-1]} from the top")))
    return paths


def run(module, images: Sequence[str], gt: str | Path, plan: Plan) -> tuple[list[dict], dict, list[str], list[str]]:
    """Every image of ``images`` (files, folders, ``skimage:NAME``) with ground truth in ``gt``
    scored (a line per image printed): the results, the photographs by name, and the skipped
    images and ground truth (each named in a warning)."""
    size = int(module.hparams.image_size)
    photos, bad_images = load_photos(images, size)
    if not Path(gt).is_dir():
        raise ConfigError(f"Setting '--gt': {str(gt)!r} is not a folder of ground truth (<name>.mat, "
                          f"<name>/*.png or <name>.png).")
    truths, bad_truth = match_truth([n for n, _, _ in photos], [hw for _, _, hw in photos], gt, size)
    todo = [(n, img) for n, img, _ in photos if n in truths]
    if not todo:
        raise ConfigError(f"No image of {list(images)} has usable ground truth in {gt} (see the warnings).")
    results = []
    for i, (name, img) in enumerate(todo, 1):
        results.append(score_image(module, name, img, truths[name], plan))
        fit = results[-1]["fit"]
        note = f", R^2 {fit['r2_mean_before']:.3f} -> {fit['r2_mean_after']:.3f} in {fit['steps']} steps" if fit else ""
        print(f"[{i}/{len(todo)}] {name}: {results[-1]['seconds']:.1f} s{note}", flush=True)
    return results, dict(todo), bad_images, bad_truth
