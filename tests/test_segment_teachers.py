"""apm segment with every teacher family (tiny random DINOv2, MViTv2, timm ViT, CLIP and several
teachers as one), whose levels live on different grids (CLIP's global level is one cell, MViTv2
halves its grid); nesting across grids; the tables' directions and hint; flags that do nothing."""

import json

import numpy as np
import pytest

from apm import segment
from apm.cli import main
from tests.conftest import CONFIGS
from tests.test_segment import bsds_mat, thresholded

TIMM = """model:
  teacher: timm
  teacher_args:
    model_name: vit_small_patch14_reg4_dinov2.lvd142m
    pretrained: false
    model_args: {depth: 2, embed_dim: 48, num_heads: 2, init_values: 1.0}
data:
  image_size: 112
"""
FAMILIES = {  # configs layered after apm.yaml; the grids of their levels
    "dinov2": (["smoke.yaml"], {(16, 16)}),
    "mvitv2": (["mvitv2.yaml", "mvitv2_smoke.yaml"], {(24, 24), (12, 12), (6, 6), (3, 3)}),
    "timm": (["smoke.yaml", "timm"], {(8, 8)}),
    "clip": (["smoke.yaml", "clip_smoke.yaml"], {(14, 14), (1, 1)}),
    "multi": (["agglomerative.yaml", "agglomerative_smoke.yaml"], {(8, 8), (24, 24), (12, 12)}),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_segment_runs_for_every_teacher_family(family, tmp_path, capsys):
    configs, grids = FAMILIES[family]
    (tmp_path / "timm.yaml").write_text(TIMM)
    args = ["--config", str(CONFIGS / "apm.yaml")]
    for c in configs:
        args += ["--config", str(tmp_path / "timm.yaml" if c == "timm" else CONFIGS / c)]
    gt = tmp_path / "gt"
    gt.mkdir()
    bsds_mat(gt / "astronaut.mat", [thresholded("astronaut", 3), thresholded("astronaut", 5)])
    out = tmp_path / "segment.json"
    assert main(["segment", *args, "--images", "skimage:astronaut", "--gt", str(gt), "--k", "2", "4",
                 "--n-init", "1", "--tree-k", "4", "2", "--figures", str(tmp_path / "fig"), "--json", str(out),
                 "--device", "cpu"]) == 0, capsys.readouterr().err
    doc = json.loads(out.read_text())
    levels = doc["settings"]["levels"]
    assert list(doc["levels"]) == levels and len(levels) >= 2
    adjacent = [f"{lo}>{up}" for lo, up in zip(levels[:-1], levels[1:])]
    assert list(doc["nesting"]["teacher"])[: len(adjacent)] == adjacent
    for v in doc["nesting"]["teacher"].values():
        assert 0 <= v["h_upper_given_lower"] <= v["h_upper"] + 1e-9 and 0 < v["share_chance"] <= v["share"] <= 1
    assert len(doc["figures"]) == 1 and (tmp_path / "fig" / "astronaut_tree_teacher.png").stat().st_size > 5000
    printed = capsys.readouterr().out
    assert "vi (bits): lower is better" in printed
    assert {tuple(g) for g in doc["settings"]["grids"].values()} == grids
    assert list(doc["settings"]["grids"]) == levels


def test_nesting_compares_levels_on_the_finer_grid():
    upper = np.array([[0, 1], [1, 1]])  # (2, 2): each cell covers 2x2 cells of the (4, 4) lower grid
    lower = np.kron(np.array([[0, 1], [2, 3]]), np.ones((2, 2), int))  # 4 islands, one per upper cell
    nested = segment.nesting(lower, upper)
    assert nested["h_upper_given_lower"] == pytest.approx(0, abs=1e-12) and nested["share"] == 1.0
    # an island straddling the upper cells (columns 1-2 of the finer grid): upsampling the upper
    # map by hand gives the same; a wrong common grid (the lower map shrunk) would not
    straddle = np.zeros((4, 4), int)
    straddle[:, 1:3] = 1
    got = segment.nesting(straddle, upper)
    fine_upper = np.kron(upper, np.ones((2, 2), int))
    assert got == segment.nesting(straddle, fine_upper)  # the same as upsampling by hand
    assert got["share"] < 1
    # the same either way round, and a global (1, 1) level holds everything
    assert segment.nesting(upper, np.zeros((1, 1), int))["share"] == 1.0
    edges = segment.tree_edges(lower, upper)
    assert edges == {0: (0, 1.0), 1: (1, 1.0), 2: (1, 1.0), 3: (1, 1.0)}


def summary(student: float, fitted: bool) -> dict:
    v = lambda c: {m: {"ods": c, "ods_k": 2, "ois": c} for m in segment.MEASURES}  # noqa: E731
    rows = {"teacher": v(0.5), "student": v(student), **({"fitted": v(0.5)} if fitted else {})}
    return {"levels": {"block1": rows, "block2": rows}, "baselines": {"colour": v(0.4), "random": v(0.3)}}


def test_tables_say_which_way_is_better_and_hint_perceive_for_an_unfitted_student():
    assert "vi (bits): lower is better" in segment.format_tables(summary(0.5, False))
    assert "--perceive" not in segment.format_tables(summary(0.5, False))
    assert "add --perceive" in segment.format_tables(summary(0.31, False))
    assert "--perceive" not in segment.format_tables(summary(0.31, True))  # already fitted


@pytest.mark.parametrize("flags, named", [
    (["--max-steps", "5"], "'--max-steps' (needs --perceive)"),
    (["--target-r2", "0.5"], "'--target-r2' (needs --perceive)"),
    (["--upsample-levels", "block1"], "'--upsample-levels' (needs --upsample 2 or more)"),
    (["--upsample", "1", "--upsample-levels", "block1"], "'--upsample-levels'"),
    (["--tree-levels", "block1", "--tree-images", "2"], "'--tree-levels' (needs --figures), '--tree-images'"),
])
def test_flags_that_do_nothing_are_refused(flags, named, tmp_path, capsys):
    assert main(["segment", "--config", str(CONFIGS / "smoke.yaml"), "--images", "skimage:astronaut",
                 "--gt", str(tmp_path), *flags]) == 2
    assert named in capsys.readouterr().err
