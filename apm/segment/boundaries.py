"""The boundary measure of the BSDS500 benchmark (``evaluation_bdry_image.m``, ``correspondPixels``,
``collect_eval_bdry.m``; Martin, Fowlkes, Malik, PAMI 2004): precision, recall and F of a machine's
boundary pixels against every annotator's, over thresholds of a boundary-strength map.

At each threshold the machine's boundary map (strength >= threshold, or a segmentation's
boundaries) is thinned to one pixel (``skimage.morphology.thin``, MATLAB's ``bwmorph(.., 'thin',
inf)``), then matched one-to-one to each annotator's boundary pixels within 0.0075 of the image
diagonal: a minimum-cost assignment (``scipy.sparse.csgraph.min_weight_full_bipartite_matching``)
on the benchmark's graph, where a matched pair costs its distance and a pixel left unmatched 100
times the radius (in hundredths of a pixel, rounded, as the benchmark's integer solver takes them).
The benchmark links each pixel to 6 random outliers, so a few pixels (0.1-0.2%) stay unmatched at
random and two of its runs differ in the fourth digit; ``correspond`` draws the links the same way
from a seed, or (``rng=None``) takes exactly a largest matching. Recall pools the annotators
(matched annotator pixels / all annotator pixels); precision counts a machine pixel matched to any
annotator. ODS takes one threshold for the set (with the benchmark's linear interpolation between
thresholds), OIS the best per image, AP the area under the precision-recall curve sampled at
recall 0, 0.01, ..., 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

MAX_DIST = 0.0075  # of the image diagonal
OUTLIER_COST = 100.0  # times the radius: the cost of leaving a pixel unmatched
MULTIPLIER = 100  # costs in hundredths of a pixel, as integers
DEGREE = 6  # random outlier links per pixel


def seg2bdry(seg: np.ndarray) -> np.ndarray:
    """The boundary pixels (bool, the map's shape) of a label map, as the benchmark's
    ``seg2bdry(seg, 'imageSize')`` draws them (the annotators' ``Boundaries`` are these, thinned)."""
    seg = np.asarray(seg)
    h, w = seg.shape
    b = np.zeros((2 * h + 1, 2 * w + 1), bool)
    ev = np.zeros((h, w), bool)
    ev[:-1] = seg[:-1] != seg[1:]
    eh = np.zeros((h, w), bool)
    eh[:, :-1] = seg[:, :-1] != seg[:, 1:]
    b[2::2, 1::2] = ev
    b[1::2, 2::2] = eh
    b[2:-1:2, 2:-1:2] = (eh[:-1, :-1] | eh[1:, :-1]) | (ev[:-1, :-1] | ev[:-1, 1:])
    b[0], b[:, 0], b[-1], b[:, -1] = b[1], b[:, 1], b[-2], b[:, -2]
    return b[2::2, 2::2]


def thin(bmap: np.ndarray) -> np.ndarray:
    """A boundary map thinned to one-pixel lines (``bwmorph(bmap, 'thin', inf)``)."""
    from skimage.morphology import thin as sk_thin

    return sk_thin(np.asarray(bmap, bool))


def _offsets(radius: float) -> np.ndarray:
    """(n, 2) integer offsets (dy, dx) within ``radius``, with the benchmark's d^2 <= r^2 test."""
    r = int(math.ceil(radius))
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
    keep = dy ** 2 + dx ** 2 <= radius * radius
    return np.stack([dy[keep], dx[keep]], 1)


def _k_of_n(rng: np.random.Generator, rows: int, k: int, n: int) -> np.ndarray:
    """(rows, k): per row, k distinct integers drawn uniformly from [0, n) (the benchmark's kOfN)."""
    out = rng.integers(0, n, (rows, k))
    while k > 1:
        srt = np.sort(out, 1)
        bad = np.flatnonzero((srt[:, 1:] == srt[:, :-1]).any(1))
        if not len(bad):
            break
        out[bad] = rng.integers(0, n, (len(bad), k))
    return out


def _pairs(p1: np.ndarray, truth: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """(pairs (machine index, annotator pixel index), cost in hundredths) of every machine pixel
    ``p1`` and annotator pixel within ``radius``."""
    h, w = truth.shape
    index2 = np.full((h, w), -1, np.int64)
    p2 = np.argwhere(truth)
    index2[p2[:, 0], p2[:, 1]] = np.arange(len(p2))
    pairs, cost = [np.zeros((0, 2), np.int64)], [np.zeros(0, np.int64)]
    for dy, dx in _offsets(radius):
        y, x = p1[:, 0] + dy, p1[:, 1] + dx
        inside = np.flatnonzero((y >= 0) & (y < h) & (x >= 0) & (x < w))
        j = index2[y[inside], x[inside]]
        hit = j >= 0
        pairs.append(np.stack([inside[hit], j[hit]], 1))
        cost.append(np.full(hit.sum(), round(math.sqrt(dy * dy + dx * dx) * MULTIPLIER)))
    return np.concatenate(pairs), np.concatenate(cost)


def _assignment_graph(i_of, j_of, cost, a: int, b: int, ow: int, rng) -> tuple[np.ndarray, ...]:
    """(rows, columns, costs) of the benchmark's assignment graph (``match.cc``): rows are the
    machine's a pixels then the annotator's b outliers, columns the annotator's b pixels then the
    machine's a outliers; each pixel is linked to 6 random outliers of its side (cost ow), the
    outliers to 6 random outliers of the other side (cost ow), and each pixel to its own outlier at
    100 ow (so a perfect matching exists)."""
    d1, d2, d3 = max(0, min(DEGREE, a - 1)), max(0, min(DEGREE, b - 1)), min(DEGREE, a, b)
    o1 = _k_of_n(rng, a, d1, max(a - 1, 1))
    o1 += o1 >= np.arange(a)[:, None]  # not its own outlier
    o2 = _k_of_n(rng, b, d2, max(b - 1, 1))
    o2 += o2 >= np.arange(b)[:, None]
    big, small = max(a, b), min(a, b)
    o3 = _k_of_n(rng, big, d3, max(small, 1))
    i3 = np.repeat(np.arange(big), d3)
    r3, c3 = (a + i3, b + o3.ravel()) if a < b else (a + o3.ravel(), b + i3)
    rows = [i_of, np.repeat(np.arange(a), d1), a + o2.ravel(), r3, np.arange(a), a + np.arange(b)]
    cols = [j_of, b + o1.ravel(), np.repeat(np.arange(b), d2), c3, b + np.arange(a), np.arange(b)]
    vals = [cost, np.full(a * d1 + b * d2 + len(i3), ow), np.full(a + b, ow * MULTIPLIER)]
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)


def correspond(machine: np.ndarray, truth: np.ndarray, max_dist: float = MAX_DIST,
               rng: np.random.Generator | int | None = 0) -> tuple[np.ndarray, np.ndarray]:
    """The benchmark's ``correspondPixels``: (matched machine pixels, matched annotator pixels), bool
    maps, of a one-to-one matching of two boundary maps within ``max_dist`` of the diagonal.

    ``rng`` (a Generator or a seed) draws the benchmark's random outlier links, as its own code
    does (which is why two runs of the benchmark on one input differ in the fourth digit: a pixel
    whose outlier has no link left must stay unmatched, about 0.1-0.2% of the matches). ``rng=None``
    links every pixel to its own outlier instead: then the matching is exactly a largest one, and
    among those the shortest."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    machine, truth = np.asarray(machine, bool), np.asarray(truth, bool)
    radius = max_dist * math.hypot(*machine.shape)
    p1, p2 = np.argwhere(machine), np.argwhere(truth)
    pairs, cost = _pairs(p1, truth, radius)
    m1, m2 = np.zeros(machine.shape, bool), np.zeros(machine.shape, bool)
    if not len(pairs):
        return m1, m2
    n1, i_of = np.unique(pairs[:, 0], return_inverse=True)  # only pixels with a partner in reach
    n2, j_of = np.unique(pairs[:, 1], return_inverse=True)
    a, b = len(n1), len(n2)
    ow = math.ceil(OUTLIER_COST * radius * MULTIPLIER)
    if rng is None:  # own outliers (cost ow); a matched pair's two outliers pair up (cost ow)
        rows = np.concatenate([i_of, np.arange(a), a + np.arange(b), a + j_of])
        cols = np.concatenate([j_of, b + np.arange(a), np.arange(b), b + i_of])
        vals = np.concatenate([cost, np.full(a + b + len(i_of), ow)])
    else:
        rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        rows, cols, vals = _assignment_graph(i_of, j_of, cost, a, b, ow, rng)
    # every cost + 1: a perfect matching has a + b edges, so no choice changes, and no edge is an
    # explicit zero (a pixel matched to itself costs 0)
    graph = coo_matrix(((vals + 1).astype(np.float64), (rows, cols)), shape=(a + b, a + b)).tocsr()
    row_ind, col_ind = min_weight_full_bipartite_matching(graph)
    real = (row_ind < a) & (col_ind < b)
    m1[tuple(p1[n1[row_ind[real]]].T)] = True
    m2[tuple(p2[n2[col_ind[real]]].T)] = True
    return m1, m2


@dataclass
class Counts:
    """Per threshold of one image: matched annotator pixels (``cnt_r``) of all of them (``sum_r``),
    matched machine pixels (``cnt_p``) of all of them (``sum_p``): ``evaluation_bdry_image``'s output."""

    thresholds: np.ndarray
    cnt_r: np.ndarray
    sum_r: np.ndarray
    cnt_p: np.ndarray
    sum_p: np.ndarray


def boundary_counts(machine_maps: Sequence[np.ndarray], truths: Sequence[np.ndarray], thresholds: Sequence[float],
                    max_dist: float = MAX_DIST, thin_machine: bool = True, rng: int | None = 0) -> Counts:
    """``Counts`` of machine boundary maps (one per threshold, bool) against the annotators'
    boundary maps ``truths``; machine maps thinned first unless ``thin_machine`` is False;
    ``rng``: the seed of the matching's outlier links (``correspond``; None: a largest matching)."""
    out = np.zeros((4, len(thresholds)), np.int64)
    rng = None if rng is None else np.random.default_rng(rng)
    truths = [np.asarray(t, bool) for t in truths]
    for t, bmap in enumerate(machine_maps):
        bmap = thin(bmap) if thin_machine else np.asarray(bmap, bool)
        any_match = np.zeros_like(bmap)
        for gt in truths:
            m1, m2 = correspond(bmap, gt, max_dist, rng)
            any_match |= m1
            out[0, t] += m2.sum()
            out[1, t] += gt.sum()
        out[2, t], out[3, t] = any_match.sum(), bmap.sum()
    return Counts(np.asarray(thresholds, np.float64), *out)


def strength_counts(pb: np.ndarray, truths: Sequence[np.ndarray], thresholds: Sequence[float],
                    max_dist: float = MAX_DIST, rng: int | None = 0) -> Counts:
    """``Counts`` of a boundary-strength map thresholded at each of ``thresholds`` (pb >= t)."""
    return boundary_counts([np.asarray(pb) >= t for t in thresholds], truths, thresholds, max_dist, rng=rng)


def thresholds(n: int) -> np.ndarray:
    """The benchmark's n thresholds of a strength map in [0, 1]: 1/(n+1) .. n/(n+1)."""
    return np.linspace(1 / (n + 1), 1 - 1 / (n + 1), n)


def _ratio(cnt, total):
    cnt, total = np.asarray(cnt, np.float64), np.asarray(total, np.float64)
    return cnt / (total + (total == 0))


def f_measure(r, p):
    """F = 2 P R / (P + R), 0 where both are 0."""
    r, p = np.asarray(r, np.float64), np.asarray(p, np.float64)
    return 2 * p * r / (p + r + ((p + r) == 0))


def max_f(thr: np.ndarray, r: np.ndarray, p: np.ndarray) -> tuple[float, float, float, float]:
    """(threshold, recall, precision, F) of the best F, interpolating linearly between adjacent
    thresholds at 100 points as the benchmark's ``maxF`` does."""
    best = (thr[0], r[0], p[0], float(f_measure(r[0], p[0])))
    d = np.linspace(0, 1, 100)
    for i in range(1, len(thr)):
        t, rr, pp = (v[i] * d + v[i - 1] * (1 - d) for v in (thr, r, p))
        f = f_measure(rr, pp)
        k = int(np.argmax(f))
        if f[k] > best[3]:
            best = (t[k], rr[k], pp[k], float(f[k]))
    return tuple(float(v) for v in best)


def collect(per_image: Sequence[Counts]) -> dict:
    """ODS (threshold, recall, precision, F over the pooled counts), OIS (each image at its best
    threshold, pooled), AP, the per-threshold curve and per-image bests: ``collect_eval_bdry``."""
    thr = per_image[0].thresholds
    total = {k: sum(getattr(c, k) for c in per_image) for k in ("cnt_r", "sum_r", "cnt_p", "sum_p")}
    best = {k: 0 for k in total}
    images = []
    for c in per_image:
        r, p = _ratio(c.cnt_r, c.sum_r), _ratio(c.cnt_p, c.sum_p)
        images.append(dict(zip(("threshold", "recall", "precision", "f"), max_f(thr, r, p))))
        f = f_measure(r, p)
        last = int(np.flatnonzero(f == f.max())[-1])  # MATLAB: ff(end) of find(F == max(F))
        for k in best:
            best[k] += getattr(c, k)[last]
    r, p = _ratio(total["cnt_r"], total["sum_r"]), _ratio(total["cnt_p"], total["sum_p"])
    ods = dict(zip(("threshold", "recall", "precision", "f"), max_f(thr, r, p)))
    r_ois, p_ois = float(_ratio(best["cnt_r"], best["sum_r"])), float(_ratio(best["cnt_p"], best["sum_p"]))
    return {"ods": ods, "ois": {"recall": r_ois, "precision": p_ois, "f": float(f_measure(r_ois, p_ois))},
            "ap": average_precision(r, p), "curve": {"thresholds": thr.tolist(), "recall": r.tolist(),
                                                     "precision": p.tolist(), "f": f_measure(r, p).tolist()},
            "images": images}


def average_precision(r: np.ndarray, p: np.ndarray) -> float:
    """Area under the precision-recall curve: precision interpolated linearly over the distinct
    recalls at 0, 0.01, ..., 1 (0 outside them), summed times 0.01, as the benchmark takes it."""
    ru, first = np.unique(r, return_index=True)
    if len(ru) < 2:
        return 0.0
    grid = np.linspace(0, 1, 101)
    pi = np.interp(grid, ru, np.asarray(p)[first], left=np.nan, right=np.nan)
    return float(np.nan_to_num(pi, nan=0.0).sum() * 0.01)
