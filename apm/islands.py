"""Islands of agreement per level: joint t-SNE colouring, k-means agreement, and figures.

Teacher and student features of one level (one image) are embedded *together* into 3 components
shown as RGB, so one colour means one place in one embedding: where the student's colours match the
teacher's, it reproduces the teacher's islands. Island agreement is measured by clustering teacher
and student features separately (k-means) and comparing the two label maps (ARI, NMI).

Everything here is a pure function of arrays; nothing loads models or files.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from einops import rearrange

from apm.codes import nearest_cells
from apm.students.base import RGB

METHODS = ("tsne", "pca")
# Up to this many points per level, apm.tsne's exact t-SNE beats scikit-learn's Barnes-Hut on a
# CPU too (one thread: 24 s against 42 s at 2,048 points, 142 s against 110 s at 4,050); beyond,
# its n^2 cost loses there. On a GPU it is used always.
_TORCH_CPU_MAX_POINTS = 3072
# Levels embedded in one batched call hold at most this many n x n entries (512 MB per buffer).
_BATCH_ENTRIES = 2**27


def as_points(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Features (h, w, d) or (N, d) as a float64 (N, d) array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(-1, x.shape[-1])


def reduce_dims(x: np.ndarray, dims: int = 50, seed: int = 0) -> np.ndarray:
    """PCA to ``dims`` components when the features are wider (t-SNE's cost grows with width)."""
    from sklearn.decomposition import PCA

    if x.shape[1] <= dims or x.shape[0] <= dims:
        return x
    return PCA(dims, random_state=seed).fit_transform(x)


def minmax(y: np.ndarray) -> np.ndarray:
    """Scale each column to [0, 1]; a constant column becomes 0.5."""
    lo, hi = y.min(0, keepdims=True), y.max(0, keepdims=True)
    span = hi - lo
    return np.where(span > 0, (y - lo) / np.where(span > 0, span, 1), 0.5)


def embed_rgb(blocks: Sequence[torch.Tensor | np.ndarray], method: str = "tsne",
              perplexity: float = 30.0, seed: int = 0, pca_dims: int = 50,
              max_iter: int = 1000, device: str | torch.device | None = None) -> list[np.ndarray]:
    """Embed several feature sets of one level together into 3 components scaled to RGB [0, 1].

    Args:
        blocks: Feature sets (h, w, d) or (N, d) of the same width, e.g. [teacher, student].
        method: ``tsne`` (t-SNE, 3 components) or ``pca`` (first 3 principal components).
        perplexity: t-SNE perplexity; lowered automatically for small point sets.
        seed: Random state of PCA and t-SNE.
        pca_dims: Wider features are reduced to this many principal components before t-SNE.
        max_iter: t-SNE iterations (at least 250).
        device: Where t-SNE runs (default the CPU). ``apm.tsne`` (exact t-SNE in torch, the
            same objective and schedule as scikit-learn's) on a GPU, and on the CPU up to 3,072
            points; scikit-learn's Barnes-Hut t-SNE for larger sets on the CPU, where it is faster.

    Returns:
        One array per block, shaped like the block with the last axis replaced by 3 (RGB in [0, 1]).
    """
    return embed_rgb_levels([blocks], method, perplexity, seed, pca_dims, max_iter, device)[0]


def embed_rgb_levels(levels: Sequence[Sequence[torch.Tensor | np.ndarray]], method: str = "tsne",
                     perplexity: float = 30.0, seed: int = 0, pca_dims: int = 50,
                     max_iter: int = 1000, device: str | torch.device | None = None) -> list[list[np.ndarray]]:
    """``embed_rgb`` for several levels (each a list of blocks), each embedded on its own. Levels
    with equally many points are embedded in one batched t-SNE."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    if method not in METHODS:
        raise ValueError(f"unknown embedding method {method!r}; use one of {METHODS}")
    device = torch.device(device or "cpu")
    pts = [[as_points(b) for b in blocks] for blocks in levels]
    xs = [np.concatenate(p) for p in pts]
    ys: list[np.ndarray | None] = [None] * len(xs)
    batches: dict[tuple[int, int], list[int]] = {}
    for i, x in enumerate(xs):
        n = x.shape[0]
        if method == "pca" or n < 8:
            z = x - x.mean(0)
            k = min(3, *z.shape)
            y = PCA(k, random_state=seed).fit_transform(z) if np.abs(z).max() > 0 else np.zeros((n, k))
            ys[i] = np.pad(y, ((0, 0), (0, 3 - k)))
            continue
        xs[i] = reduce_dims(x, pca_dims, seed)
        # sklearn's "auto" rate, n / 12 / 4, floored at 10 instead of 50: in 3-D, small sets
        # (a few hundred points) diverge at 50 and near-copies of a point land far apart.
        perp, rate = min(perplexity, (n - 1) / 3), max(n / 48, 10.0)
        if device.type != "cpu" or n <= _TORCH_CPU_MAX_POINTS:
            batches.setdefault(xs[i].shape, []).append(i)
        else:
            ys[i] = TSNE(n_components=3, perplexity=perp, init="pca", learning_rate=rate,
                         random_state=seed, max_iter=max(250, max_iter), method="barnes_hut",
                         ).fit_transform(xs[i].astype(np.float32))
    for (n, _), idx in batches.items():
        from apm.tsne import collapsed, tsne

        per_call = max(1, _BATCH_ENTRIES // (n * n))
        for part in (idx[j : j + per_call] for j in range(0, len(idx), per_call)):
            x = torch.from_numpy(np.stack([xs[i] for i in part])).to(device, torch.float32)
            y = tsne(x, 3, min(perplexity, (n - 1) / 3), max(n / 48, 10.0), max(250, max_iter))
            for i, yi, bad in zip(part, y.double().cpu().numpy(), collapsed(y).tolist()):
                if bad:  # not even float64 unfolded it: a grey panel would say nothing
                    warnings.warn("t-SNE collapsed to a point on one level; its colours are the first 3 "
                                  "principal components instead.", stacklevel=2)
                    yi = PCA(3, random_state=seed).fit_transform(xs[i] - xs[i].mean(0))
                ys[i] = yi
    out = []
    for blocks, p, y in zip(levels, pts, ys):
        rgb, start, maps = minmax(y), 0, []
        for b, q in zip(blocks, p):
            maps.append(rgb[start : start + len(q)].reshape(*tuple(b.shape[:-1]), 3))
            start += len(q)
        out.append(maps)
    return out


def kmeans_labels(x: torch.Tensor | np.ndarray, k: int = 8, seed: int = 0,
                  tries: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """k-means labels (N,) of features (h, w, d) or (N, d), best (lowest inertia) of ``tries``
    k-means++ starts, and the indices (k,) of the locations that started the best run. k is
    capped at the number of distinct feature vectors."""
    from sklearn.cluster import KMeans, kmeans_plusplus

    pts = as_points(x)
    k = max(1, min(k, len(np.unique(pts, axis=0))))
    rng = np.random.RandomState(seed)
    best = None
    for _ in range(max(1, tries)):
        _, idx = kmeans_plusplus(pts, k, random_state=rng)
        km = KMeans(k, init=pts[idx], n_init=1).fit(pts)
        if best is None or km.inertia_ < best[0]:
            best = (km.inertia_, km.labels_, idx)
    return best[1], best[2]


def island_agreement(teacher: torch.Tensor | np.ndarray, student: torch.Tensor | np.ndarray,
                     k: int = 8, seed: int = 0) -> dict[str, float]:
    """Adjusted Rand index and NMI between the k-means label maps of teacher and student features
    of one image and level.

    k-means runs on each separately, and both start from their own features at the same k
    locations (the teacher's best k-means++ start): on features without sharp clusters (random
    teachers) k-means has many near-equal optima, and separately seeded runs would differ by which
    optimum they reach rather than by how the features differ.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    t, s = as_points(teacher), as_points(student)
    if t.shape[0] != s.shape[0]:
        raise ValueError(f"teacher has {t.shape[0]} locations, student {s.shape[0]}")
    a, idx = kmeans_labels(t, k, seed)
    with warnings.catch_warnings():  # a near-constant student may leave clusters empty: fine
        warnings.simplefilter("ignore")
        b = KMeans(len(idx), init=s[idx], n_init=1).fit_predict(s)
    return {"ari": float(adjusted_rand_score(a, b)), "nmi": float(normalized_mutual_info_score(a, b))}


def upsample_nearest(rgb: np.ndarray, size: int) -> np.ndarray:
    """An (h, w, 3) map enlarged by nearest neighbour to (size, size, 3) (any h, w)."""
    h, w = rgb.shape[:2]
    return rgb[nearest_cells(size, h)][:, nearest_cells(size, w)]


def image_to_array(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """An image (3, H, W) tensor or (H, W, 3) array in [0, 1] as (H, W, 3) float array."""
    if isinstance(image, torch.Tensor):
        image = rearrange(image.detach().float().cpu(), "c h w -> h w c").numpy()
    return np.clip(np.asarray(image, dtype=np.float64), 0, 1)


@dataclass
class LevelRow:
    """One row of an island figure: a level's name, grid and its teacher / student colour maps."""

    name: str
    teacher: np.ndarray | None
    student: np.ndarray | None = None
    note: str = ""

    @property
    def grid(self) -> tuple[int, int]:
        m = self.teacher if self.teacher is not None else self.student
        return tuple(m.shape[:2])


def level_rows(names: Sequence[str], teacher: Sequence[torch.Tensor | np.ndarray],
               student: Sequence[torch.Tensor | np.ndarray] | None = None, method: str = "tsne",
               perplexity: float = 30.0, seed: int = 0, max_iter: int = 1000,
               device: str | torch.device | None = None) -> list[LevelRow]:
    """Colour maps per level: teacher (and student) features (h, w, d) embedded together (t-SNE
    on ``device``, see ``embed_rgb``).

    The ``rgb`` level (patch-mean colours) is shown as the colours themselves.
    """
    blocks = [[teacher[i]] + ([student[i]] if student is not None else []) for i in range(len(names))]
    colour = [name == RGB and as_points(teacher[i]).shape[1] == 3 for i, name in enumerate(names)]
    embedded = iter(embed_rgb_levels([b for b, c in zip(blocks, colour) if not c], method,
                                     perplexity, seed, max_iter=max_iter, device=device))
    rows = []
    for name, b, c in zip(names, blocks, colour):
        maps = ([np.clip(as_points(x), 0, 1).reshape(*tuple(x.shape[:-1]), 3) for x in b] if c
                else next(embedded))
        rows.append(LevelRow(name, maps[0], maps[1] if student is not None else None))
    return rows


def _legend(with_student: bool, with_ari: bool, chars: int) -> str:
    """What the colours and the row labels mean, printed under the figure, wrapped to ``chars``."""
    import textwrap

    parts = ["Colour: where a location's features fall in one 3-D embedding of this row's"
             + (" teacher and student" if with_student else "") + " features, shown as RGB: equal "
             "colours are similar features, within a row only."]
    if with_ari:
        parts.append("ARI: agreement of the k-means islands of student and teacher (1 equal, 0 chance).")
    return "\n".join(textwrap.fill(p, max(chars, 20)) for p in parts)


def island_figure(image: torch.Tensor | np.ndarray, rows: Sequence[LevelRow],
                  path: str | Path | None = None, display: int = 192, title: str | None = None):
    """A figure with a row per level and columns input | teacher islands | student islands.

    Coarse grids are drawn at their own resolution, enlarged by nearest neighbour to ``display``
    pixels. The student column is left out when no row has one. Saves a PNG to ``path`` if given
    and returns the matplotlib figure (closed when saved).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = image_to_array(image)
    with_student = any(r.student is not None for r in rows)
    narrow = display < 120  # a header wider than its panel would run into the next one
    sep = "\n" if narrow else " "
    cols = ["input", f"teacher{sep}islands"] + ([f"student{sep}islands"] if with_student else [])
    dpi = 100
    pad_top = (0.6 if narrow else 0.45) + (0.3 if title else 0)
    cell = display / dpi + 0.1
    width = len(cols) * cell + 0.9
    legend = _legend(with_student, any(r.note for r in rows), int(width * dpi / 5.6))
    pad_bottom = 0.12 + 0.13 * (legend.count("\n") + 1)
    fig = plt.figure(figsize=(width, len(rows) * cell + pad_top + pad_bottom), dpi=dpi)
    fig.subplots_adjust(left=0.9 / fig.get_figwidth(), right=0.9 / width + len(cols) * cell / width - 0.01,
                        bottom=pad_bottom / fig.get_figheight(),
                        top=1 - pad_top / fig.get_figheight(), wspace=0.05, hspace=0.1)
    fig.text(0.02, 0.06 / fig.get_figheight(), legend, fontsize=7, va="bottom", ha="left", color="0.25")
    axes = np.asarray(fig.subplots(len(rows), len(cols), squeeze=False))
    inp = upsample_image(img, display)
    for r, row in enumerate(rows):
        panels = [inp, row.teacher] + ([row.student] if with_student else [])
        for c, p in enumerate(panels):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if p is None:
                ax.axis("off")
                continue
            ax.imshow(p if c == 0 else upsample_nearest(p, display), interpolation="nearest")
            if r == 0:
                ax.set_title(cols[c], fontsize=7 if narrow else 9)
        h, w = row.grid
        label = f"{row.name}\n{h}x{w}" + (f"\n{row.note}" if row.note else "")
        axes[r, 0].set_ylabel(label, fontsize=6 if narrow else 8)  # vertical: as long as a small panel
    if title:  # pinned to the top edge, clear of the column headers below it
        fig.suptitle(title, fontsize=10, y=1 - 0.08 / fig.get_figheight(), va="top")
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
    return fig


def upsample_image(img: np.ndarray, size: int) -> np.ndarray:
    """A photograph (H, W, 3) in [0, 1] resized to (size, size, 3) for display."""
    from PIL import Image

    pil = Image.fromarray((img * 255).round().astype(np.uint8))
    return np.asarray(pil.resize((size, size), Image.BILINEAR), dtype=np.float64) / 255
