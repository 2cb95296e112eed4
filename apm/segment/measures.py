"""The region measures of the BSDS500 benchmark (Arbelaez, Maire, Fowlkes, Malik, TPAMI 2011) from
contingency tables, and ODS/OIS over a set of images.

Each measure is taken per image against every annotator and averaged over annotators, as the
benchmark's code does (``evaluation_reg_image.m``, ``match_segmentations2.m``):

- ``covering``: covering of the annotator's segmentation G by the machine's S,
  (1/N) sum_{R in G} |R| max_{R' in S} |R n R'| / |R u R'|. The benchmark pools the regions of
  all annotators, which is the mean over annotators (every annotator covers all N pixels).
- ``pri``: Probabilistic Rand Index, the mean over annotators of the Rand index (the share of
  pixel pairs on which S and G agree: same region in both, or different in both).
- ``vi``: Variation of Information, H(S) + H(G) - 2 I(S, G), in bits: the benchmark's code takes
  logarithms to base 2 (``log2`` in ``variation_of_information``), so its published values are bits.
- ``ari``: adjusted Rand index, not a BSDS measure; chance scores 0.

ODS (optimal dataset scale) picks one setting (k, or a threshold) for the whole set, OIS (optimal
image scale) the best per image, each measure on its own (``ods_ois``), as ``collect_eval_reg.m``
does with thresholds. Every score goes through ``mean_scores`` of the tables of one image.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

MEASURES = ("covering", "pri", "vi", "ari")
HIGHER_IS_BETTER = {"covering": True, "pri": True, "vi": False, "ari": True}
VI_BASE = 2.0  # the BSDS benchmark's code uses log2: VI in bits


def compact(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 0..m-1 in order of value, same shape, int64."""
    return np.unique(labels, return_inverse=True)[1].reshape(np.shape(labels)).astype(np.int64)


def contingency(seg: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Pixel counts (machine regions, annotated regions) of two label maps of one shape (what
    ``sklearn.metrics.cluster.contingency_matrix`` gives: a row or column per label present)."""
    seg, gt = np.asarray(seg), np.asarray(gt)
    if seg.shape != gt.shape:
        raise ValueError(f"label maps of shapes {seg.shape} and {gt.shape}")
    a, b = (_small_labels(x) for x in (seg, gt))
    m = int(b.max()) + 1
    c = np.bincount((a * m + b).ravel(), minlength=(int(a.max()) + 1) * m).reshape(-1, m)
    return c[c.any(1)][:, c.any(0)]


def _small_labels(x: np.ndarray) -> np.ndarray:
    """Non-negative int64 labels with a small range: the map itself when it already is one (fast
    at a photograph's pixels), else its labels renumbered (``compact``)."""
    if x.size and x.dtype.kind in "iub" and x.min() >= 0 and x.max() < 4 * x.size + 1024:
        return x.astype(np.int64, copy=False)
    return compact(x)


def entropy(counts: np.ndarray) -> float:
    """Entropy in nats of a distribution given by counts."""
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def covering_of(c: np.ndarray) -> float:
    """Covering of the columns' segmentation (ground truth) by the rows' (machine)."""
    c = np.asarray(c, dtype=np.float64)
    union = c.sum(1, keepdims=True) + c.sum(0, keepdims=True) - c
    iou = np.divide(c, union, out=np.zeros_like(c), where=union > 0)
    return float((c.sum(0) * iou.max(0)).sum() / c.sum())


def rand_of(c: np.ndarray) -> float:
    """Rand index: the share of unordered pixel pairs on which the two segmentations agree."""
    c = np.asarray(c, dtype=np.float64)
    n = c.sum()
    if n < 2:
        return 1.0
    disagree = (c.sum(1) ** 2).sum() + (c.sum(0) ** 2).sum() - 2 * (c ** 2).sum()  # 2x the pairs
    return float(1 - disagree / (n * (n - 1)))


def vi_of(c: np.ndarray, base: float = VI_BASE) -> float:
    """Variation of information H(S) + H(G) - 2 I(S, G), in units of log ``base`` (2: bits)."""
    from sklearn.metrics import mutual_info_score

    c = np.asarray(c, dtype=np.float64)
    mi = mutual_info_score(None, None, contingency=c)  # nats
    return max(0.0, (entropy(c.sum(1)) + entropy(c.sum(0)) - 2 * mi) / math.log(base))


def ari_of(c: np.ndarray) -> float:
    """Adjusted Rand index from a contingency table (what ``sklearn.metrics.adjusted_rand_score``
    gives for the label maps; tested against it)."""
    c = np.asarray(c, dtype=np.float64)
    pairs = lambda x: float((x * (x - 1) / 2).sum())  # noqa: E731
    n = c.sum()
    both, rows, cols, total = pairs(c), pairs(c.sum(1)), pairs(c.sum(0)), n * (n - 1) / 2
    expected, top = rows * cols / max(total, 1.0), (rows + cols) / 2
    if top == expected:  # both trivial (one region each, or one pixel per region): identical
        return 1.0
    return float((both - expected) / (top - expected))


def scores_of(c: np.ndarray) -> dict[str, float]:
    """The four measures from one contingency table (rows machine, columns annotator)."""
    return {"covering": covering_of(c), "pri": rand_of(c), "vi": vi_of(c), "ari": ari_of(c)}


def best_covering(tables: Sequence[Sequence[np.ndarray]]) -> float:
    """Covering when each annotated region takes its best machine region over every setting
    (``tables[setting][annotator]``), pooled over annotators: the benchmark's ``best`` column."""
    num = den = 0.0
    for per_setting in zip(*tables):  # one annotator's tables, a setting each
        best = 0.0
        for c in per_setting:
            c = np.asarray(c, dtype=np.float64)
            union = c.sum(1, keepdims=True) + c.sum(0, keepdims=True) - c
            best = np.maximum(best, np.divide(c, union, out=np.zeros_like(c), where=union > 0).max(0))
        area = np.asarray(per_setting[0], np.float64).sum(0)
        num, den = num + float((area * best).sum()), den + float(area.sum())
    return num / den


def mean_scores(tables: Iterable[np.ndarray]) -> dict[str, float]:
    """The four measures of one machine segmentation, each averaged over its annotators' tables."""
    per = [scores_of(c) for c in tables]
    return {m: float(np.mean([p[m] for p in per])) for m in MEASURES}


def ods_ois(per_image: Sequence[dict[int, dict[str, float]]],
            weights: Sequence[float] | None = None) -> dict[str, dict[str, float]]:
    """Per measure: ``ods`` (the best mean over images at one k, and that ``ods_k``) and ``ois``
    (the mean over images of each image's best k); ``per_image[i][k][measure]`` (k: a cluster
    count or a threshold; ties go to the smallest, as MATLAB's ``max`` takes the first). Covering is
    averaged with ``weights`` (default equal): the benchmark pools the ground-truth regions of all
    images, which weights an image by its annotators times its pixels; PRI and VI are plain means."""
    ks = sorted(set.intersection(*(set(p) for p in per_image)))
    out = {}
    for m in MEASURES:
        best = max if HIGHER_IS_BETTER[m] else min
        w = weights if m == "covering" and weights is not None else None
        mean = {k: float(np.average([p[k][m] for p in per_image], weights=w)) for k in ks}
        k_ods = best(ks, key=lambda k: mean[k])
        ois = float(np.average([best(p[k][m] for k in ks) for p in per_image], weights=w))
        out[m] = {"ods": mean[k_ods], "ods_k": int(k_ods) if float(k_ods).is_integer() else float(k_ods),
                  "ois": ois}
    return out


