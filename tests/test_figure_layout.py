"""Island figures are readable at every panel size: no two texts overlap, none is cut off, and a
legend under the figure says what the colours and the ARI mean."""

import itertools

import numpy as np
import pytest

from apm.islands import LevelRow, island_figure


@pytest.mark.parametrize("display", [32, 64, 192])
def test_island_figure_texts_do_not_collide_and_a_legend_explains_them(display):
    rng = np.random.default_rng(0)
    rows = [LevelRow(f"block{i}", rng.random((16, 16, 3)), rng.random((16, 16, 3)), "ARI 0.50") for i in (3, 6)]
    fig = island_figure(rng.random((224, 224, 3)), rows, None, display, title="astronaut")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = [t for t in fig.findobj(lambda a: hasattr(a, "get_text") and hasattr(a, "get_window_extent"))
             if t.get_visible() and t.get_text()]
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
    w, h = fig.get_size_inches() * fig.dpi
    assert not [(a, b) for (a, p), (b, q) in itertools.combinations(boxes, 2) if p.overlaps(q)]
    assert all(b.x0 >= 0 and b.y0 >= 0 and b.x1 <= w and b.y1 <= h for _, b in boxes), boxes
    legend = " ".join(t for t, _ in boxes if t.startswith("Colour:")).replace("\n", " ")
    assert "equal colours are similar features" in legend and "ARI" in legend
