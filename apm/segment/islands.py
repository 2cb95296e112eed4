"""Islands: k-means label maps of a level's features, the chance partitions and patch colours they
are compared with, and the features of a level at any grid (the teacher's upsampled bilinearly, the
student's queried there)."""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from apm.segment.truth import Truth


def kmeans_maps(feats: torch.Tensor | np.ndarray, ks: Sequence[int], seed: int = 0,
                n_init: int = 3) -> dict[int, np.ndarray]:
    """k-means label maps (h, w) of features (h, w, d), one per k (capped at the distinct
    vectors): scikit-learn's KMeans, ``n_init`` k-means++ starts, fixed seed, one thread (its
    OpenMP threads on a busy machine cost more than they save at these sizes)."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    from apm.islands import as_points

    h, w = feats.shape[:2]
    pts = as_points(feats).astype(np.float32)
    distinct = len(np.unique(pts, axis=0))
    out = {}
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning on near-duplicate points
        for k in ks:
            km = KMeans(max(1, min(int(k), distinct)), n_init=n_init, random_state=seed)
            out[int(k)] = km.fit_predict(pts).reshape(h, w)
    return out


def random_maps(grid: tuple[int, int], ks: Sequence[int], seed: int = 0) -> dict[int, np.ndarray]:
    """The chance baseline: per k, a random partition of the grid into k Voronoi cells (centres
    drawn uniformly among the grid's cells, seeded): regions as compact as islands, blind to the image."""
    from apm.codes import grid_coords

    pts = grid_coords(grid).numpy()
    out = {}
    for k in ks:  # one generator per (seed, k): a k's partition does not depend on the other ks
        rng = np.random.default_rng([int(seed), int(k)])
        centres = pts[rng.choice(len(pts), min(int(k), len(pts)), replace=False)]
        out[int(k)] = ((pts[:, None] - centres[None]) ** 2).sum(-1).argmin(1).reshape(grid)
    return out


def patch_colours(image: torch.Tensor, patch: int) -> torch.Tensor:
    """Mean colour (h, w, 3) of each patch of an image (3, S, S): the ``rgb`` level's target."""
    return rearrange(F.avg_pool2d(image[None].float(), patch)[0], "c h w -> h w c")


def upsample_features(feats: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Features (h, w, d) resized bilinearly to ``grid`` (H, W) (cell centres aligned)."""
    x = rearrange(feats.float(), "h w d -> 1 d h w")
    return rearrange(F.interpolate(x, size=tuple(grid), mode="bilinear", align_corners=False),
                     "1 d h w -> h w d")


@torch.no_grad()
def student_features(module, image: torch.Tensor, level: int, grid: tuple[int, int],
                     chunk: int = 4096) -> torch.Tensor:
    """The student's features (h, w, d), teacher's scale, of one level queried at the cell
    centres of any ``grid``: its field at another resolution is just more queries."""
    from apm.codes import grid_coords

    coords = grid_coords(tuple(grid), module.device)
    pred = module.student.query(image[None].to(module.device), level, coords, chunk)
    out = module.standardizer.decode(level, pred.float())[0]
    return rearrange(out, "(h w) d -> h w d", h=grid[0], w=grid[1]).cpu()


def score_maps(maps: dict[int, np.ndarray], truth: Truth) -> dict[int, dict[str, float]]:
    """The measures of each k's label map against an image's ground truth."""
    return {k: truth.score(m) for k, m in maps.items()}


