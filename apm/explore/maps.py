"""What the explore page shows of one photograph: k-means islands of each level for the teacher,
the student and (when fitting) the student fitted to the photograph; how far each student's
islands agree with the teacher's; and, with ground truth, how far each source's islands agree
with people (the region measures of ``apm segment``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from apm.explore.page import image_uri, rle_encode
from apm.segment import kmeans_maps, student_features, upsample_labels


@dataclass
class ExplorePlan:
    """What ``photo_entry`` computes.

    Args:
        levels: The module's level indices shown, lowest first.
        ks: k-means cluster counts (the page's k buttons).
        seed: Seed of k-means and of the fitting (``apm.runlog.image_seed``).
        n_init: k-means++ starts per k-means.
        student: Show the module's own student (False for an untrained one).
        recipe: A ``FitRecipe``: also fit a copy of the student to each photograph (``fitted``).
        upsample: > 1: query the students' fields at this many times each level's grid (their
            islands are then finer than the teacher's); the teacher stays on its grid.
    """

    levels: list[int]
    ks: list[int]
    seed: int = 0
    n_init: int = 3
    student: bool = True
    recipe: Any = None
    upsample: int = 1


@torch.no_grad()
def _student_features(module, image: torch.Tensor, levels: Sequence[int], upsample: int) -> list[torch.Tensor]:
    """A student's features (h, w, d) of each level: on the level's grid, or its field queried at
    ``upsample`` times the grid."""
    if upsample > 1:
        return [student_features(module, image, i, tuple(upsample * g for g in module.levels[i].grid))
                for i in levels]
    return [f[0].cpu() for f in module.predict_features(image[None].to(module.device), levels)]


def photo_features(module, name: str, image: torch.Tensor, plan: ExplorePlan):
    """Per source (teacher, student, fitted), the features (h, w, d) of each planned level; the
    fitting record (or None)."""
    from apm.perceive import perceive_images
    from apm.runlog import image_seed

    with torch.no_grad():
        targets = module.targets(image[None].to(module.device))
    feats = {"teacher": [targets[i][0].cpu() for i in plan.levels]}
    if plan.student:
        feats["student"] = _student_features(module, image, plan.levels, plan.upsample)
    record = None
    if plan.recipe is not None:
        ((_, fitted, record),) = perceive_images(module, image[None], [image_seed(name, plan.seed)],
                                                 plan.recipe, progress=False, features=targets)
        feats["fitted"] = _student_features(fitted, image, plan.levels, plan.upsample)
    return feats, record


def match_labels(labels: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``labels`` renamed so that each island takes the name of the reference island it overlaps
    most under a one-to-one matching (Hungarian, on the overlap counts; a coarser reference is
    enlarged to ``labels``' grid); islands left over get names the reference does not use. Only
    the names change, so that one colour means matching islands of teacher and student."""
    from scipy.optimize import linear_sum_assignment

    a, b = labels.ravel(), upsample_labels(reference, labels.shape).ravel()
    na, nb = int(a.max()) + 1, int(b.max()) + 1
    overlap = np.bincount(a * nb + b, minlength=na * nb).reshape(na, nb)
    rows, cols = linear_sum_assignment(-overlap)
    names = np.full(na, -1)
    names[rows] = cols
    spare = iter(range(max(na, nb), max(na, nb) + na))
    names = np.array([n if n >= 0 else next(spare) for n in names])
    return names[labels]


def island_maps(feats: dict[str, list[torch.Tensor]], names: Sequence[str], plan: ExplorePlan
                ) -> dict[str, dict[str, dict[int, np.ndarray]]]:
    """source -> level -> k -> label map (h, w); every other source's islands renamed after the
    teacher's (``match_labels``)."""
    maps = {s: {n: kmeans_maps(f, plan.ks, plan.seed, plan.n_init) for n, f in zip(names, fs)}
            for s, fs in feats.items()}
    for source, levels in maps.items():
        if source != "teacher":
            for n, by_k in levels.items():
                for k, m in by_k.items():
                    by_k[k] = match_labels(m, maps["teacher"][n][k])
    return maps


def agreement(maps: dict) -> dict[str, dict[str, dict[str, float]]]:
    """level -> k -> source -> the adjusted Rand index of that source's islands with the teacher's."""
    from sklearn.metrics import adjusted_rand_score

    def ari(t: np.ndarray, m: np.ndarray) -> float:  # on the finer grid: the teacher's cells enlarged
        return round(float(adjusted_rand_score(upsample_labels(t, m.shape).ravel(), m.ravel())), 4)

    teacher = maps["teacher"]
    return {n: {str(k): {s: ari(teacher[n][k], maps[s][n][k]) for s in maps if s != "teacher"}
                for k in teacher[n]} for n in teacher}


def truth_scores(maps: dict, truth) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """source -> level -> k -> the region measures (covering, PRI, VI in bits, ARI; mean over the
    annotators) of the islands against ``truth`` (an ``apm.segment`` ``Truth``)."""
    return {s: {n: {str(k): {m: round(v, 4) for m, v in truth.score(lab).items()} for k, lab in by_k.items()}
                for n, by_k in levels.items()} for s, levels in maps.items()}


def photo_entry(module, name: str, image: torch.Tensor, plan: ExplorePlan, truth=None) -> dict:
    """Everything the page holds of one photograph (JSON-ready): the photograph (a JPEG data URI
    of the (3, S, S) image the student sees), each source's grid per level, the label maps as run-length
    arrays (``rle_encode``) per source, level and k, their agreement with the teacher, and with
    ``truth`` the annotators' maps at S x S and the scores against them; seconds spent."""
    start = time.perf_counter()
    names = [module.levels[i].name for i in plan.levels]
    feats, record = photo_features(module, name, image, plan)
    maps = island_maps(feats, names, plan)
    entry = {
        "name": name, "image": image_uri(image),
        "grids": {s: {n: list(by_k[plan.ks[0]].shape) for n, by_k in lv.items()} for s, lv in maps.items()},
        "maps": {s: {n: {str(k): rle_encode(m) for k, m in by_k.items()} for n, by_k in lv.items()}
                 for s, lv in maps.items()},
        "ari": agreement(maps) if len(maps) > 1 else {},
        "gt": None,
        "fit": None if record is None else {k: record[k] for k in ("steps", "seconds", "r2_mean_before",
                                                                   "r2_mean_after") if k in record},
    }
    if truth is not None:
        entry["gt"] = {"maps": [rle_encode(m) for m in truth.maps], "scores": truth_scores(maps, truth)}
    entry["seconds"] = round(time.perf_counter() - start, 2)
    return entry
