"""Islands scored against people: the region measures of the BSDS500 benchmark (Arbelaez, Maire,
Fowlkes, Malik, TPAMI 2011) for k-means islands of each level, the part-whole nesting of islands
across levels, and a parse-tree figure. The library behind ``apm segment`` (no argument parsing).

Measures, each per image against every annotator of that image and averaged over annotators, as
the benchmark's code does (``evaluation_reg_image.m``, ``match_segmentations2.m``):

- ``covering``: covering of the annotator's segmentation G by the machine's S,
  (1/N) sum_{R in G} |R| max_{R' in S} |R n R'| / |R u R'|. The benchmark pools the regions of
  all annotators, which is the mean over annotators (every annotator covers all N pixels).
- ``pri``: Probabilistic Rand Index, the mean over annotators of the Rand index (the share of
  pixel pairs on which S and G agree: same region in both, or different in both).
- ``vi``: Variation of Information, H(S) + H(G) - 2 I(S, G), in bits: the benchmark's code takes
  logarithms to base 2 (``log2`` in ``variation_of_information``), so its published values are bits.
- ``ari``: adjusted Rand index, not a BSDS measure; chance scores 0.

ODS (optimal dataset scale) picks one k for the whole set, OIS (optimal image scale) the best k
per image, each measure on its own (``ods_ois``), as ``collect_eval_reg.m`` does with thresholds.

Ground truth: BSDS ``.mat`` files (a 1xN cell ``groundTruth`` of structs with ``Segmentation``,
uint16 labels from 1) or PNG label maps, found by image name in one folder (``find_truth``):
``<dir>/<name>.mat``, ``<dir>/<name>/*.png`` (one PNG per annotator) or ``<dir>/<name>.png`` (one
annotator). Ground truth is cropped as the image is (``apm.data.image_transform``: shorter side
resized to the input size, centre square), by nearest neighbour (``crop_truth``).

Islands live on a level's grid (h, w); they are scored at the ground truth's pixels by nearest
neighbour without making the upsampled map: ``Truth.counts`` holds, per grid cell, how many pixels
of each annotated region it covers, so one contingency table is a matrix product.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from apm.errors import APMError

MEASURES = ("covering", "pri", "vi", "ari")
HIGHER_IS_BETTER = {"covering": True, "pri": True, "vi": False, "ari": True}
VI_BASE = 2.0  # the BSDS benchmark's code uses log2: VI in bits
SOURCES = ("teacher", "student", "fitted")  # whose features the islands are of
BASELINES = ("colour", "random")


class BadGroundTruth(APMError, ValueError):
    """A ground-truth file that cannot be used: unreadable, not in the expected layout, or not the
    size of its image."""


# -- measures --------------------------------------------------------------------------------------
def compact(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 0..m-1 in order of value, same shape, int64."""
    return np.unique(labels, return_inverse=True)[1].reshape(np.shape(labels)).astype(np.int64)


def contingency(seg: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Pixel counts (machine regions, annotated regions) of two label maps of one shape."""
    from sklearn.metrics.cluster import contingency_matrix

    seg, gt = np.asarray(seg), np.asarray(gt)
    if seg.shape != gt.shape:
        raise ValueError(f"label maps of shapes {seg.shape} and {gt.shape}")
    return contingency_matrix(seg.ravel(), gt.ravel())


def _entropy(counts: np.ndarray) -> float:
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
    return max(0.0, (_entropy(c.sum(1)) + _entropy(c.sum(0)) - 2 * mi) / math.log(base))


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


def region_scores(seg: np.ndarray, truths: np.ndarray | Sequence[np.ndarray]) -> dict[str, float]:
    """covering, pri, vi, ari of a machine label map against one annotator's map or a list of
    them (each measure averaged over annotators); all maps of one shape."""
    truths = [truths] if isinstance(truths, np.ndarray) else list(truths)
    per = [scores_of(contingency(seg, gt)) for gt in truths]
    return {m: float(np.mean([p[m] for p in per])) for m in MEASURES}


def covering(seg: np.ndarray, truths: np.ndarray | Sequence[np.ndarray]) -> float:
    """Segmentation covering of the ground truth by ``seg`` (mean over annotators)."""
    return region_scores(seg, truths)["covering"]


def pri(seg: np.ndarray, truths: np.ndarray | Sequence[np.ndarray]) -> float:
    """Probabilistic Rand Index: the Rand index averaged over annotators."""
    return region_scores(seg, truths)["pri"]


def vi(seg: np.ndarray, truths: np.ndarray | Sequence[np.ndarray]) -> float:
    """Variation of information in bits, averaged over annotators."""
    return region_scores(seg, truths)["vi"]


def ari(seg: np.ndarray, truths: np.ndarray | Sequence[np.ndarray]) -> float:
    """Adjusted Rand index, averaged over annotators."""
    return region_scores(seg, truths)["ari"]


def ods_ois(per_image: Sequence[dict[int, dict[str, float]]],
            weights: Sequence[float] | None = None) -> dict[str, dict[str, float]]:
    """Per measure: ``ods`` (the best mean over images at one k, and that ``ods_k``) and ``ois``
    (the mean over images of each image's best k); ``per_image[i][k][measure]``. Covering is
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
        out[m] = {"ods": mean[k_ods], "ods_k": int(k_ods), "ois": ois}
    return out


# -- ground truth ----------------------------------------------------------------------------------
def _struct_field(item, name: str):
    """A field of one element of a MATLAB cell of structs as loadmat returns it."""
    names = getattr(getattr(item, "dtype", None), "names", None)
    if not names or name not in names:
        raise KeyError(name)
    value = item[name]
    while isinstance(value, np.ndarray) and value.dtype == object and value.size == 1:
        value = value.ravel()[0]  # loadmat wraps a struct's fields in (1, 1) object arrays
    return value


def read_mat(path: str | Path) -> list[np.ndarray]:
    """The annotators' label maps of a BSDS ``.mat`` file (a 1xN cell ``groundTruth`` of structs
    with a ``Segmentation`` field); BadGroundTruth naming the file otherwise."""
    import scipy.io

    try:
        cells = scipy.io.loadmat(str(path)).get("groundTruth")
    except Exception as e:  # scipy raises many types for broken files
        raise BadGroundTruth(f"{path}: not a readable .mat file ({type(e).__name__}: {str(e)[:120]})") from None
    if cells is None:
        raise BadGroundTruth(f"{path}: no 'groundTruth' variable (BSDS layout: a 1xN cell of structs "
                             f"with a 'Segmentation' field)")
    maps = []
    for item in np.asarray(cells).ravel():
        try:
            seg = np.asarray(_struct_field(item, "Segmentation"))
        except (KeyError, IndexError, TypeError, ValueError):
            raise BadGroundTruth(f"{path}: an entry of 'groundTruth' has no 'Segmentation' field") from None
        maps.append(check_map(seg, path))
    if not maps:
        raise BadGroundTruth(f"{path}: 'groundTruth' holds no segmentation")
    return maps


def check_map(seg: np.ndarray, path: str | Path) -> np.ndarray:
    """A label map as int64, or BadGroundTruth: it must be a non-empty 2-D array of integers."""
    if seg.ndim != 2 or seg.size == 0 or seg.dtype.kind not in "uifb":
        raise BadGroundTruth(f"{path}: a segmentation is not a 2-D label map (shape {seg.shape}, "
                             f"type {seg.dtype})")
    if seg.dtype.kind == "f" and not np.array_equal(seg, np.round(seg)):
        raise BadGroundTruth(f"{path}: a segmentation holds non-integer labels")
    return seg.astype(np.int64)


def read_png(path: str | Path) -> np.ndarray:
    """One annotator's label map from a PNG: grey levels or palette indices are labels; in a colour
    PNG every distinct colour is one region (alpha ignored)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr"):
                rgb = np.asarray(img.convert("RGB"), dtype=np.int64)
                arr = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
            else:
                arr = np.asarray(img)
    except Exception as e:
        raise BadGroundTruth(f"{path}: not a readable PNG label map ({type(e).__name__})") from None
    return check_map(np.asarray(arr), path)


def find_truth(folder: str | Path) -> dict[str, Path]:
    """Ground truth by image name in ``folder``: ``<name>.mat``, a folder ``<name>/`` of PNGs (one
    per annotator), or ``<name>.png`` (one annotator), in that order of preference."""
    folder = Path(folder)
    found: dict[str, Path] = {}
    for kind in ("mat", "dir", "png"):
        for p in sorted(folder.iterdir()):
            is_kind = (p.is_dir() and any(p.glob("*.png"))) if kind == "dir" else (
                p.is_file() and p.suffix.lower() == f".{kind}")
            if is_kind:
                found.setdefault(p.stem if kind != "dir" else p.name, p)
    return found


def read_truth(path: str | Path, image_hw: tuple[int, int] | None = None) -> list[np.ndarray]:
    """Every annotator's map of one image (a ``.mat``, a PNG or a folder of PNGs); BadGroundTruth
    when unreadable or when a map is not ``image_hw`` (rows, columns) in size."""
    path = Path(path)
    if path.is_dir():
        maps = [read_png(p) for p in sorted(path.glob("*.png"))]
    elif path.suffix.lower() == ".mat":
        maps = read_mat(path)
    else:
        maps = [read_png(path)]
    if not maps:
        raise BadGroundTruth(f"{path}: no label map")
    for m in maps:
        if image_hw is not None and tuple(m.shape) != tuple(image_hw):
            raise BadGroundTruth(f"{path}: a label map is {m.shape[0]}x{m.shape[1]} (rows x columns), "
                                 f"its image {image_hw[0]}x{image_hw[1]}")
    return maps


def crop_truth(gt: np.ndarray, size: int) -> np.ndarray:
    """A label map cropped as its image is for the student (shorter side resized to ``size``,
    centre square), by nearest neighbour at pixel centres; labels renumbered 0..m-1."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    t = torch.from_numpy(compact(gt).astype(np.float32))[None]  # exact below 2^24 labels
    t = TF.resize(t, [size], interpolation=InterpolationMode.NEAREST_EXACT, antialias=False)
    return compact(TF.center_crop(t, [size, size])[0].numpy().astype(np.int64))


def cell_counts(gt: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(h*w, m): per cell of a grid laid over the map, the pixels of each region (labels 0..m-1)
    whose centre falls in it: a grid map's nearest-neighbour upsampling, as counts."""
    (H, W), (h, w) = gt.shape, grid
    rows = np.minimum(((np.arange(H) + 0.5) * h / H).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(W) + 0.5) * w / W).astype(np.int64), w - 1)
    cell = rows[:, None] * w + cols[None, :]
    m = int(gt.max()) + 1
    return np.bincount((cell * m + gt).ravel(), minlength=h * w * m).reshape(h * w, m)


def upsample_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A grid's label map (h, w) enlarged to ``shape`` by nearest neighbour at pixel centres (the
    map ``cell_counts`` scores)."""
    (h, w), (H, W) = labels.shape, shape
    rows = np.minimum(((np.arange(H) + 0.5) * h / H).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(W) + 0.5) * w / W).astype(np.int64), w - 1)
    return labels[rows][:, cols]


@dataclass
class Truth:
    """One image's ground truth, cropped: ``maps`` (one (S, S) map per annotator, labels 0..m-1)."""

    name: str
    source: Path | None
    maps: list[np.ndarray]
    _counts: dict = field(default_factory=dict, repr=False)

    def counts(self, grid: tuple[int, int]) -> list[np.ndarray]:
        if grid not in self._counts:
            self._counts[grid] = [cell_counts(m, grid) for m in self.maps]
        return self._counts[grid]

    def score(self, labels: np.ndarray) -> dict[str, float]:
        """The measures of a grid label map (h, w), upsampled by nearest neighbour, against every
        annotator (mean over them)."""
        lab = compact(labels).ravel()
        onehot = np.zeros((int(lab.max()) + 1, lab.size))
        onehot[lab, np.arange(lab.size)] = 1
        per = [scores_of(onehot @ c) for c in self.counts(tuple(labels.shape))]
        return {m: float(np.mean([p[m] for p in per])) for m in MEASURES}


def load_truth(name: str, path: Path, image_hw: tuple[int, int], size: int) -> Truth:
    """``read_truth`` of one image, cropped to ``size`` (BadGroundTruth when unusable)."""
    return Truth(name, path, [crop_truth(m, size) for m in read_truth(path, image_hw)])


def match_truth(names: Sequence[str], sizes: Sequence[tuple[int, int]], folder: str | Path,
                size: int) -> tuple[dict[str, Truth], list[str]]:
    """Ground truth for each image name (original size (rows, columns)); a missing or bad file is
    named in a warning and its image skipped. Returns the truths and the skip messages."""
    found = find_truth(folder)
    truths, skipped = {}, []
    for name, hw in zip(names, sizes):
        try:
            if name not in found:
                raise BadGroundTruth(f"{name}: no ground truth in {folder} ({name}.mat, {name}/*.png "
                                     f"or {name}.png)")
            truths[name] = load_truth(name, found[name], hw, size)
        except BadGroundTruth as e:
            warnings.warn(f"skipped: {e}", stacklevel=2)
            skipped.append(str(e))
    return truths, skipped


# -- islands ---------------------------------------------------------------------------------------
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


# -- part-whole hierarchy --------------------------------------------------------------------------
def nesting(lower: np.ndarray, upper: np.ndarray) -> dict[str, float]:
    """How far the islands of one level lie inside single islands of the level above, over the
    locations of one grid: ``h_upper_given_lower`` H(upper | lower) in nats (0: nested),
    ``h_upper`` H(upper) (its value if the lower islands said nothing), ``share`` (the share of
    locations whose lower island's majority upper island is their own; 1: nested) and
    ``share_chance`` (its value for independent maps: the largest upper island's share)."""
    from sklearn.metrics import mutual_info_score

    c = contingency(lower, upper).astype(np.float64)
    h_upper = _entropy(c.sum(0))
    given = max(0.0, h_upper - mutual_info_score(None, None, contingency=c))
    return {"h_upper_given_lower": given, "h_upper": h_upper,
            "share": float(c.max(1).sum() / c.sum()), "share_chance": float(c.sum(0).max() / c.sum())}


def tree_edges(lower: np.ndarray, upper: np.ndarray) -> dict[int, tuple[int, float]]:
    """Per lower island: its majority upper island and the share of it inside that island."""
    c = contingency(compact(lower), compact(upper))
    return {i: (int(row.argmax()), float(row.max() / row.sum())) for i, row in enumerate(c)}


def island_colours(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(k, 3): the mean colour of the photograph (S, S, 3) under each island of a grid map."""
    lab = upsample_labels(compact(labels), image.shape[:2]).ravel()
    k = int(lab.max()) + 1
    sums = np.stack([np.bincount(lab, image.reshape(-1, 3)[:, c], k) for c in range(3)], 1)
    return sums / np.maximum(np.bincount(lab, minlength=k), 1)[:, None]


def _tree_layout(maps: Sequence[np.ndarray]) -> list[dict[int, float]]:
    """x positions in [0, 1] of each level's islands (top level first), children near parents."""
    top = compact(maps[0])
    order = sorted(range(int(top.max()) + 1), key=lambda i: np.argwhere(top == i)[:, 1].mean())
    xs = [{i: (j + 0.5) / len(order) for j, i in enumerate(order)}]
    for upper, lower in zip(maps[:-1], maps[1:]):
        edges = tree_edges(lower, upper)
        cols = {i: np.argwhere(compact(lower) == i)[:, 1].mean() for i in edges}
        order = sorted(edges, key=lambda i: (xs[-1][edges[i][0]], cols[i]))
        xs.append({i: (j + 0.5) / len(order) for j, i in enumerate(order)})
    return xs


def parse_tree_figure(image: torch.Tensor, names: Sequence[str], maps: Sequence[np.ndarray],
                      path: str | Path, title: str = "") -> Path:
    """A parse tree of islands: a row per level (``names``/``maps`` from the top level down), its
    islands painted in their mean colour beside a node per island (area as size) linked to the
    island of the level above that holds most of it (line width: that share)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from apm.islands import image_to_array

    img = image_to_array(image)
    n = len(maps)
    fig, axes = plt.subplots(n + 1, 2, figsize=(7.5, 1.3 * (n + 1) + 0.3), dpi=90,
                             gridspec_kw={"width_ratios": [1, 3.6]}, squeeze=False)
    for ax in axes[:, 1]:
        ax.remove()
    tree = fig.add_subplot(axes[0, 0].get_gridspec()[:, 1])  # rows align: level r sits at y = n - 1 - r
    axes[0, 0].imshow(img)
    xs = _tree_layout(maps)
    for r, (name, m) in enumerate(zip(names, maps)):
        lab, colours = compact(m), island_colours(img, m)
        axes[r + 1, 0].imshow(colours[upsample_labels(lab, img.shape[:2])], interpolation="nearest")
        axes[r + 1, 0].set_ylabel(f"{name}\nk={lab.max() + 1}", fontsize=8)
        y, area = n - 1 - r, np.bincount(lab.ravel()) / lab.size
        if r:
            for i, (parent, share) in tree_edges(m, maps[r - 1]).items():
                tree.plot([xs[r][i], xs[r - 1][parent]], [y, y + 1], color="0.45", lw=0.4 + 2.6 * share, zorder=1)
        for i, x in xs[r].items():
            tree.scatter([x], [y], s=40 + 900 * area[i], color=np.clip(colours[i], 0, 1),
                         edgecolors="k", linewidths=0.6, zorder=2)
    for ax in axes[:, 0]:
        ax.set_xticks([]), ax.set_yticks([])
    tree.set_ylim(-0.5, n + 0.5)
    tree.set_xlim(0, 1)
    tree.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.01, top=0.94 if title else 0.99, hspace=0.08)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# -- the benchmark ---------------------------------------------------------------------------------
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
    """(name, image (3, S, S) as ``apm.data.image_transform`` makes it, original (rows, columns))
    for image files, folders and ``skimage:NAME``; a missing or unreadable one is named in a
    warning and skipped (returned second)."""
    from apm.data import find_images, image_transform, load_image, skimage_names, skimage_photo
    from apm.errors import UnreadableImageError

    tf, out, skipped = image_transform(size), [], []
    for spec in specs:
        if spec.startswith("skimage:"):
            pils = [(n, skimage_photo(n)) for n in skimage_names(spec, "--images")]
        else:
            files = find_images(Path(spec)) if Path(spec).exists() else []
            if not files:
                skipped.append(f"{spec}: no such image file or folder of images")
                warnings.warn(f"skipped: {skipped[-1]}", stacklevel=2)
            pils = []
            for f in files:
                try:
                    pils.append((f.stem, load_image(f)))
                except UnreadableImageError as e:
                    skipped.append(str(e))
                    warnings.warn(f"skipped: {e}", stacklevel=2)
        out += [(n, tf(p), (p.height, p.width)) for n, p in pils]
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
    import time

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
    """The summary as text: a table per level (a row per source; ODS and OIS of each measure),
    the baselines, the any-resolution scores and the nesting of adjacent levels."""
    head = "".join(f"{m + ' ODS (k) OIS':>22}" for m in MEASURES)
    cell = lambda v: f"{v['ods']:>10.3f} ({v['ods_k']:>2}) {v['ois']:.3f}"  # noqa: E731
    row = lambda label, v: f"  {label:<18}" + "".join(cell(v[m]) for m in MEASURES)  # noqa: E731
    lines = []
    blocks = [(f"level {n}", v) for n, v in summary["levels"].items()]
    blocks += [("baselines (patch colours, random Voronoi)", summary["baselines"])]
    blocks += [(f"any resolution: level {n}", v) for n, v in summary.get("fine", {}).items()]
    for title, rows in blocks:
        lines += [title, f"  {'':<18}{head}"] + [row(s, v) for s, v in rows.items()]
    for s, pairs in summary.get("nesting", {}).items():
        lines.append(f"nesting of adjacent levels, then of each level in itself ({s}): "
                     f"H(upper|lower) nats / H(upper) / share / chance share")
        lines += [f"  {p:<20}{v['h_upper_given_lower']:>8.3f}{v['h_upper']:>8.3f}{v['share']:>8.3f}"
                  f"{v['share_chance']:>8.3f}" for p, v in pairs.items()]
    return "\n".join(lines)


def to_json(summary: dict, results: Sequence[dict], **extra) -> dict:
    """The JSON document: the summary, per-image scores (per source, level and k; annotators and
    covering weight), nesting and fitting records, and ``extra`` (settings, skipped inputs, seconds)."""
    per_image = [{"name": r["name"], "annotators": r["annotators"], "weight": r["weight"],
                  "scores": r["scores"], "baselines": r["baselines"], "nesting": r["nesting"], "fine": r["fine"],
                  "seconds": round(r["seconds"], 3), "cpu_seconds": round(r["cpu_seconds"], 3),
                  "fit": {k: v for k, v in (r["fit"] or {}).items() if k != "curve"} or None}
                 for r in results]
    return {**summary, **extra, "per_image": per_image}
