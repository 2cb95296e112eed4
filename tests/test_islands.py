"""Island tools as pure functions on real teacher features, and the one-image overfit result:
a student fit to one image reproduces its teacher's k-means islands (ARI > 0.5 at every level),
an untrained one does not."""

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from apm import islands
from apm.data import image_transform, skimage_photo
from teachers import create_teacher

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def features():
    """Real features of a real photograph: the tiny random DINOv2 at 112 px (8x8 grid, width 32)."""
    image = image_transform(112)(skimage_photo("astronaut"))
    teacher = create_teacher("dinov2_tiny", image_size=112)
    return image, [f[0] for f in teacher(image[None])]


def test_agreement_is_one_for_identical_and_falls_with_noise(features):
    _, feats = features
    x = islands.as_points(feats[1])
    assert islands.island_agreement(x, x) == {"ari": 1.0, "nmi": 1.0}
    rng = np.random.default_rng(0)
    scale = x.std()
    aris = [islands.island_agreement(x, x + rng.normal(size=x.shape) * scale * s)["ari"]
            for s in (0.02, 0.3, 3.0)]
    assert aris[0] > 0.9 and aris[0] > aris[1] > aris[2]
    shuffled = x[rng.permutation(len(x))]  # same features, wrong places: no agreement
    assert abs(islands.island_agreement(x, shuffled)["ari"]) < 0.15


@pytest.mark.parametrize("method", ["tsne", "pca"])
def test_joint_embedding_gives_one_colour_per_place(features, method):
    """Teacher and student are embedded together: a student equal to the teacher gets the
    teacher's colour at every location, a student shifted by a constant gets colours of its own.
    Embedded separately, the shifted student would be coloured like the teacher: t-SNE and PCA
    both ignore a translation."""
    _, feats = features
    t = feats[2]  # 8x8 grid: 128 points in the joint embedding
    ct, cs = islands.embed_rgb([t, t.clone()], method=method, perplexity=10)
    assert ct.shape == (8, 8, 3) and cs.shape == (8, 8, 3)
    both = np.concatenate([ct, cs])
    assert both.min() == 0 and both.max() == 1  # min-max scaled over the joint embedding
    diff = np.abs(ct - cs)
    assert diff.mean() < 0.02 and diff.max() < 0.15, (diff.mean(), diff.max())

    ct, cs = islands.embed_rgb([t, t + 3 * t.std()], method=method, perplexity=10)
    pairs = np.linalg.norm(cs.reshape(-1, 1, 3) - ct.reshape(1, -1, 3), axis=-1)
    assert pairs.min() > 0.3, pairs.min()  # no student colour is near any teacher colour


def test_nearest_upsampling_keeps_cells():
    cells = np.arange(2 * 3 * 3, dtype=float).reshape(2, 3, 3)
    big = islands.upsample_nearest(cells, 6)
    assert big.shape == (6, 6, 3)
    assert (big[:3, :2] == cells[0, 0]).all() and (big[3:, 4:] == cells[1, 2]).all()


def test_figure_rows_columns_and_coarse_grids(tmp_path, features):
    image, feats = features
    coarse = torch.nn.functional.avg_pool2d(feats[0].permute(2, 0, 1), 2).permute(1, 2, 0)  # 4x4 grid
    rows = islands.level_rows(["fine", "coarse"], [feats[0], coarse], [feats[0] * 0.9, coarse * 0.9],
                              method="pca")
    path = tmp_path / "fig.png"
    islands.island_figure(image, rows, path, display=64)
    teacher_only = islands.island_figure(image, islands.level_rows(["fine"], [feats[0]], method="pca"),
                                         tmp_path / "t.png", display=64)
    with Image.open(path) as im, Image.open(tmp_path / "t.png") as t:
        a, b = np.asarray(im.convert("RGB")), np.asarray(t.convert("RGB"))
    assert a.shape[1] > b.shape[1] and a.shape[0] > b.shape[0]  # 3 columns and 2 rows vs 2 and 1
    assert a.std() > 20 and len(np.unique(a.reshape(-1, 3), axis=0)) > 100
    assert teacher_only is not None


# -- one image, overfit ------------------------------------------------------------------------------
def _overfit_script():
    spec = importlib.util.spec_from_file_location("overfit_one_image",
                                                  ROOT / "experiments" / "overfit_one_image.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


STEPS = 150


@pytest.fixture(scope="module")
def overfit_run():
    """A fresh student fit to one photograph's teacher features by the experiment's real Trainer
    (112 px, every location of every level per step); scored untrained (step 0) and at STEPS."""
    image = image_transform(112)(skimage_photo("astronaut"))
    return _overfit_script().overfit(image, "astronaut", steps=(STEPS,), hidden_dims=(128, 128),
                                     lr=5e-3, figures=False)


@pytest.mark.slow
def test_overfit_student_reproduces_islands_at_every_level(overfit_run):
    final = overfit_run["steps"][STEPS]["levels"]
    assert set(final) == {"block1", "block2", "block3", "rgb"}
    for name, m in final.items():
        assert m["ari"] > 0.5, (name, m)
        assert m["r2"] > 0.9, (name, m)
    assert overfit_run["loss"][-1] < 0.2 * overfit_run["loss"][0]


@pytest.mark.slow
def test_untrained_student_scores_clearly_lower(overfit_run):
    untrained = overfit_run["steps"][0]["levels"]
    final = overfit_run["steps"][STEPS]["levels"]
    for name in final:
        assert untrained[name]["ari"] < 0.3, (name, untrained[name])
        assert final[name]["ari"] - untrained[name]["ari"] > 0.4, name
