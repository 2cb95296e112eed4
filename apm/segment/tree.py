"""The part-whole hierarchy of islands: how far one level's islands nest in the next level's
(``nesting``), and the parse-tree figure. Levels may live on different grids (a global level is
one cell, MViTv2 halves its grid); they are compared on one grid, the coarser map upsampled by
nearest neighbour (``on_one_grid``)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from apm.segment.measures import compact, contingency, entropy
from apm.segment.truth import upsample_labels


def on_one_grid(*maps: np.ndarray) -> list[np.ndarray]:
    """Label maps brought to one grid: each enlarged by nearest neighbour to the largest rows and
    columns among them (unchanged when they already share a grid)."""
    if len({np.shape(m) for m in maps}) == 1:
        return list(maps)
    shape = (max(m.shape[0] for m in maps), max(m.shape[1] for m in maps))
    return [m if m.shape == shape else upsample_labels(m, shape) for m in maps]


def nesting(lower: np.ndarray, upper: np.ndarray) -> dict[str, float]:
    """How far the islands of one level lie inside single islands of the level above, over the
    locations of one grid (the finer of the two): ``h_upper_given_lower`` H(upper | lower) in nats (0: nested),
    ``h_upper`` H(upper) (its value if the lower islands said nothing), ``share`` (the share of
    locations whose lower island's majority upper island is their own; 1: nested) and
    ``share_chance`` (its value for independent maps: the largest upper island's share)."""
    from sklearn.metrics import mutual_info_score

    c = contingency(*on_one_grid(lower, upper)).astype(np.float64)
    h_upper = entropy(c.sum(0))
    given = max(0.0, h_upper - mutual_info_score(None, None, contingency=c))
    return {"h_upper_given_lower": given, "h_upper": h_upper,
            "share": float(c.max(1).sum() / c.sum()), "share_chance": float(c.sum(0).max() / c.sum())}


def tree_edges(lower: np.ndarray, upper: np.ndarray) -> dict[int, tuple[int, float]]:
    """Per lower island: its majority upper island and the share of it inside that island."""
    c = contingency(*on_one_grid(compact(lower), compact(upper)))
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
    fig.text(0.99, 0.003, "node area: the island's share of the photograph; line width: the share of it "
             "inside the island above", ha="right", va="bottom", fontsize=6.5, color="0.3")
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.025, top=0.94 if title else 0.99, hspace=0.08)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


