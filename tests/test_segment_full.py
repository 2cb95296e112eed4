"""apm segment --resolution full: the whole photograph at its aspect ratio, islands at its pixels,
scored on the uncropped ground truth with the region and boundary measures; gPb-owt-ucm maps; the
hook where a student queried at any coordinate plugs in."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from apm.cli import main
from apm.cli import load_student
from apm.segment import Truth, full, ucm
from apm.segment import boundaries as B
from tests.conftest import CONFIGS
from tests.test_segment import bsds_mat

H, W = 150, 230  # not multiples of 14, not square


def drawn() -> tuple[torch.Tensor, np.ndarray]:
    """A grey photograph (3, H, W) with a red ellipse and bar drawn off-centre, and its label map."""
    ys, xs = np.mgrid[:H, :W]
    region = ((ys - 0.4 * H) ** 2 / (0.25 * H) ** 2 + (xs - 0.65 * W) ** 2 / (0.15 * W) ** 2) < 1
    region |= (xs > 0.15 * W) & (xs < 0.3 * W) & (ys > 0.2 * H) & (ys < 0.9 * H)
    image = torch.full((3, H, W), 0.5)
    image[:, torch.from_numpy(region)] = torch.tensor([1.0, 0.0, 0.0])[:, None]
    return image, region.astype(np.int64)


@pytest.fixture(scope="module")
def tiny():
    return load_student(None, [str(CONFIGS / "apm.yaml"), str(CONFIGS / "smoke.yaml")], "cpu")


def test_bilinear_features_at_pixels_are_the_grid_resized():
    grid = torch.randn(7, 11, 5)
    got = full.grid_features_at(grid)(full.pixel_coords((H, W))).reshape(H, W, 5)
    want = F.interpolate(grid.permute(2, 0, 1)[None], size=(H, W), mode="bilinear", align_corners=False)
    torch.testing.assert_close(got, want[0].permute(1, 2, 0), rtol=1e-5, atol=1e-5)
    assert full.teacher_size((481, 321), 14) == (476, 322) and full.teacher_size((5, 20), 14) == (14, 14)


def test_full_resolution_truth_and_features_stay_aligned(tiny):
    """Islands of the teacher's patch colours at the photograph's pixels find the drawn region:
    they disagree with its label map only within a patch of its edge; the same map moved by 10
    pixels (or transposed coordinates) would not."""
    image, labels = drawn()
    grids, colours = full.teacher_grids(tiny, image, [0])
    assert tuple(colours.shape) == (154 // 14, 224 // 14, 3) == tuple(grids[0].shape[:2]) + (3,)
    islands = full.pixel_islands(full.grid_features_at(colours), (H, W), [2], sample=5000)[2]
    red = islands == islands[int(0.4 * H), int(0.65 * W)]
    off = red != labels.astype(bool)
    assert off.mean() < 0.08, off.mean()
    near = np.zeros_like(off)  # within 10 px of the drawn edge (half a patch of blur, plus rounding)
    edge = B.seg2bdry(labels)
    for dy, dx in np.argwhere(np.ones((21, 21))) - 10:
        near |= np.roll(edge, (dy, dx), (0, 1))
    assert not (off & ~near).any()
    assert (red != np.roll(labels, 10, 1).astype(bool)).mean() > 1.5 * off.mean()
    truth = Truth("drawn", None, [labels])
    assert truth.score(islands)["covering"] > 0.85


def test_a_student_queried_at_pixels_plugs_in(tiny):
    """``features_at(image, level, coords)``: a field that sees the pixels (here the photograph's
    own colour at each coordinate) is scored beside the teacher's grid, and draws the region's
    edges exactly where the grid's bilinear islands blur them."""
    image, labels = drawn()

    def colour_at(img, level, coords):
        return full.grid_features_at(img.permute(1, 2, 0))(coords)
    plan = full.FullPlan(levels=[0], ks=[2], thresholds=3, features_at=colour_at, student_name="field", sample=4000)
    r = full.score_full_image(tiny, "drawn", image, Truth("drawn", None, [labels]), plan)
    assert set(r["scores"]) == {"teacher_bilinear", "colour", "field"}
    field, colour = r["scores"]["field"]["block1"][2], r["scores"]["colour"]["patch colours"][2]
    assert field["covering"] == pytest.approx(1.0) and colour["covering"] < 0.97
    got = B.collect([r["boundary"]["field"]])
    assert got["ods"]["f"] == pytest.approx(1.0) and B.collect([r["boundary"]["colour"]])["ods"]["f"] < 0.9


def ucm2_of(seg: np.ndarray) -> np.ndarray:
    """A ucm2 (2H+1, 2W+1) whose boundaries at strength 0.7 are those of ``seg``: edges between
    differing neighbours, corners where any of their edges is one, the frame as the rows and
    columns inside it (as in the benchmark's files)."""
    h, w = seg.shape
    u = np.zeros((2 * h + 1, 2 * w + 1))
    u[2:-1:2, 1::2] = 0.7 * (seg[:-1] != seg[1:])
    u[1::2, 2:-1:2] = 0.7 * (seg[:, :-1] != seg[:, 1:])
    u[2:-1:2, 2:-1:2] = np.maximum.reduce([u[1:-2:2, 2:-1:2], u[3::2, 2:-1:2], u[2:-1:2, 1:-2:2], u[2:-1:2, 3::2]])
    u[0], u[-1], u[:, 0], u[:, -1] = u[1], u[-2], u[:, 1], u[:, -2]  # the frame repeats its neighbours
    return u


def connected_pieces(seg: np.ndarray) -> np.ndarray:
    """Each 4-connected piece of each label its own label."""
    from scipy.ndimage import label

    pieces = np.zeros_like(seg)
    for v in np.unique(seg):
        lab, _ = label(seg == v)
        pieces[lab > 0] = lab[lab > 0] + pieces.max()
    return pieces


def test_ucm2_regions_and_strength():
    """Below the boundaries' strength, the regions are the segmentation's 4-connected pieces (a
    corner is closed when any of its edges is, so 8-connectivity on the double grid cannot leak
    between diagonal pixels); above it, one region."""
    rng = np.random.default_rng(0)
    seg = np.kron(rng.integers(0, 3, (6, 9)), np.ones((5, 4), int))  # blocks; some touch diagonally
    pieces = connected_pieces(seg)
    u = ucm2_of(seg)
    for t in (0.1, 0.5):
        got = ucm.ucm_regions(u, t)
        assert got.shape == seg.shape and len(np.unique(got)) == len(np.unique(pieces))
        assert Truth("s", None, [pieces]).score(got)["vi"] == pytest.approx(0, abs=1e-12)
    assert len(np.unique(ucm.ucm_regions(u, 0.8))) == 1
    assert np.array_equal(ucm.ucm_strength(u) >= 0.5, B.seg2bdry(seg))


def test_segment_command_at_full_resolution(tmp_path, capsys):
    photo = Image.open(__import__("skimage").data.__path__[0] + "/coffee.png").convert("RGB")  # 400x600
    grey = np.asarray(photo.convert("L"), float)
    bands = np.digitize(grey, np.quantile(grey, [0.33, 0.66]))
    coarse = connected_pieces(np.kron(bands[::40, ::40], np.ones((40, 40), int))[:400, :600])  # a blocky person
    (tmp_path / "img").mkdir(), (tmp_path / "gt").mkdir(), (tmp_path / "ucm").mkdir()
    photo.save(tmp_path / "img" / "coffee.png")
    bsds_mat(tmp_path / "gt" / "coffee.mat", [coarse, coarse])
    import scipy.io
    scipy.io.savemat(str(tmp_path / "ucm" / "coffee.mat"), {"ucm2": ucm2_of(coarse)})
    out = tmp_path / "full.json"
    assert main(["segment", "--config", str(CONFIGS / "apm.yaml"), "--config", str(CONFIGS / "smoke.yaml"),
                 "--images", str(tmp_path / "img"), "--gt", str(tmp_path / "gt"), "--resolution", "full",
                 "--ucm", str(tmp_path / "ucm"), "--levels", "block1", "block3", "--k", "2", "3",
                 "--n-init", "1", "--thresholds", "3", "--contours", "--json", str(out), "--device", "cpu"]) == 0
    doc = json.loads(out.read_text())
    assert doc["per_image"][0]["hw"] == [400, 600] and doc["images"] == 1
    assert set(doc["boundaries"]) == {"teacher_bilinear", "teacher_bilinear:contours", "colour", "ucm"}
    assert set(doc["regions"]) == {"teacher_bilinear", "colour", "ucm"}
    assert set(doc["regions"]["teacher_bilinear"]) == {"block1", "block3"}
    # gPb-owt-ucm's map here is the annotators' own segmentation: perfect at every threshold below 0.7
    u = doc["regions"]["ucm"]["gPb-owt-ucm"]
    assert u["covering"]["ods"] == pytest.approx(1.0) and u["vi"]["ods"] == pytest.approx(0.0, abs=1e-9)
    assert doc["boundaries"]["ucm"]["ods"]["f"] == pytest.approx(1.0)
    assert 0 < doc["boundaries"]["teacher_bilinear"]["ods"]["f"] < 1
    assert "vi (bits): lower is better" in capsys.readouterr().out
    assert main(["segment", "--config", str(CONFIGS / "smoke.yaml"), "--images", "x", "--gt", str(tmp_path),
                 "--ucm", str(tmp_path)]) == 2
    assert "'--ucm' (needs --resolution full)" in capsys.readouterr().err
    assert main(["segment", "--config", str(CONFIGS / "smoke.yaml"), "--images", "x", "--gt", str(tmp_path),
                 "--resolution", "full", "--contours", "--no-boundaries"]) == 2
    assert "'--contours' and '--no-boundaries'" in capsys.readouterr().err


def test_the_students_query_at_pixels_is_its_field():
    """``student_query``: the photograph resized to the student's square, the student asked at any
    coordinate on the teacher's scale; at its own cell centres that is its dense prediction, and
    between them a different answer for each pixel coordinate."""
    from apm.codes import grid_coords

    module = load_student(str(CONFIGS.parent / "tests" / "data" / "single_dinov2_tiny.ckpt"), None, "cpu")
    size = int(module.hparams.image_size)
    image = torch.rand(3, size, size)
    at = full.student_query(module, chunk=7)
    for level, lvl in enumerate(module.levels):
        got = at(image, level, grid_coords(lvl.grid))
        want = module.predict_features(image[None], [level])[0][0].reshape(-1, lvl.dim)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    pixels = at(image, 0, full.pixel_coords((size, size)))
    assert pixels.shape == (size * size, module.levels[0].dim) and len(torch.unique(pixels[:, 0])) > size


def windowed(tmp_path):
    """A fresh tiny module whose student sees the 5 x 5 pixels around each query."""
    from apm.cli import module_from_configs

    return module_from_configs([CONFIGS / "apm.yaml", CONFIGS / "smoke.yaml"],
                               {"student": {"pixel_window": 5, "pixel_spacing": 2.0}})


def test_the_student_reads_its_column_from_the_square_and_the_pixels_from_the_photograph(tmp_path):
    """``query(x, level, coords, column=square)``: the paper's plain query vector [T, PE, pixels]
    with T from the square input and the pixels around each query from the photograph at its own
    size, decoded unfactorized, is what the factorized query answers."""
    module = windowed(tmp_path)
    student = module.student
    photo, _ = drawn()
    x, sq = full.teacher_input(module, photo), full.square(module, photo)
    coords = torch.rand(37, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = student.query(x, 2, coords, chunk=10, column=sq)
        want = student.decode(2, student.first(student.query_vectors(student.trigger(sq), 2, coords, images=x)))
        square_only = student.query(sq, 2, coords)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (got - square_only).abs().max() > 1e-3  # the pixels are the photograph's, not the square's


def test_the_field_at_the_photographs_own_size_is_the_teacher_at_its_passes_cells(tmp_path):
    """``field_query``: fitted on the teacher's 4 passes of the whole photograph at its aspect
    (150 x 230 -> 154 x 224 px, an 11 x 16 grid), it answers the teacher's own features at the
    cells of the unmoved pass and of the pass moved by (7, 7) px, computed here on the moved window
    of the mirrored photograph; ``teacher_k4`` answers the same there, and differs between."""
    module = windowed(tmp_path)
    photo, _ = drawn()
    x = full.teacher_input(module, photo)
    assert x.shape[-2:] == (154, 224)
    moved = F.pad(x, (0, 7, 0, 7), mode="reflect")[..., 7:161, 7:231]
    with torch.no_grad():
        at_cells, at_moved = module.teacher.extract(x), module.teacher.extract(moved)
    at = full.field_query(module, passes=4)
    level = len(module.teacher.levels) - 1
    k4 = full.teacher_lattice(module, photo, [level], 4)[0]
    cells = torch.stack(torch.meshgrid((torch.arange(11) + 0.5) / 11, (torch.arange(16) + 0.5) / 16,
                                       indexing="ij"), -1).reshape(-1, 2)
    for coords, want in ((cells, at_cells), (cells + torch.tensor([7 / 154, 7 / 224]), at_moved)):
        want = want[level][0].reshape(-1, want[level].shape[-1]).float()
        torch.testing.assert_close(at(photo, level, coords), want, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(k4(coords), want, atol=1e-4, rtol=1e-4)
    between = cells[:40] + torch.tensor([3 / 154, 2 / 224])
    assert (at(photo, level, between) - k4(between)).abs().max() > 1e-3


def test_segment_scores_the_field_at_full_resolution_beside_the_teacher_from_the_same_passes(tmp_path):
    """``apm segment --resolution full --perceive --field``: the field (fitted at the photograph's
    size) and bilinear from the same 4 teacher passes are scored beside the teacher's grid."""
    ckpt = str(CONFIGS.parent / "tests" / "data" / "single_dinov2_tiny.ckpt")
    photo = torch.from_numpy(np.array(Image.open(__import__("skimage").data.__path__[0] + "/coffee.png")
                                      .convert("RGB"))).permute(2, 0, 1).float() / 255
    (tmp_path / "img").mkdir(), (tmp_path / "gt").mkdir()
    Image.fromarray((photo.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(tmp_path / "img" / "coffee.png")
    seg = np.zeros((400, 600), int)
    seg[:, 300:] = 1
    bsds_mat(tmp_path / "gt" / "coffee.mat", [seg])
    out = tmp_path / "full.json"
    assert main(["segment", "--ckpt", ckpt, "--images", str(tmp_path / "img"), "--gt", str(tmp_path / "gt"),
                 "--resolution", "full", "--perceive", "--field", "--levels", "0", "--k", "2",
                 "--n-init", "1", "--thresholds", "3", "--no-boundaries", "--json", str(out), "--device", "cpu"]) == 0
    doc = json.loads(out.read_text())
    assert {"field", "teacher_k4", "teacher_bilinear"} <= set(doc["regions"]) and doc["settings"]["field"] is True


@pytest.mark.parametrize("band", [1, 4, 64])
def test_contour_strength_is_the_whole_photographs_feature_gradient_whatever_the_band(band):
    """Rows go ``band`` at a time; the strength is that of the whole photograph at once: per source
    the gradient magnitude of unit-length features (np.gradient), over its 99th percentile, clipped,
    then the mean over the sources."""
    hw = (23, 31)
    grids = [torch.rand(5, 7, 4, generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    ats = [full.grid_features_at(g) for g in grids]
    want = []
    for at in ats:
        f = at(full.pixel_coords(hw)).reshape(*hw, -1).numpy()
        f = f / np.linalg.norm(f, axis=-1, keepdims=True)
        gy, gx = np.gradient(f, axis=(0, 1))
        g = np.sqrt((gy ** 2 + gx ** 2).sum(-1))
        want.append(np.clip(g / np.percentile(g, 99), 0, 1))
    np.testing.assert_allclose(full.contour_strength(ats, hw, band=band, chunk=50), np.mean(want, 0), atol=1e-5)


def test_contours_of_features_that_are_the_pixels_lie_on_the_drawn_edges():
    """Features that are the photograph's own colours turn only at the drawn shapes' edges: every
    strong pixel lies within a pixel of the label map's boundary, and the boundary measure finds
    the drawn boundary."""
    image, region = drawn()
    at = full.grid_features_at(image.permute(1, 2, 0) + 0.1)  # no zero vector
    strength = full.contour_strength([at], (H, W))
    edge = B.seg2bdry(region)
    near = np.zeros_like(edge)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            near |= np.roll(edge, (dy, dx), axis=(0, 1))
    assert strength[~near].max() < 1e-4 and strength[edge].mean() > 0.5
    counts = B.strength_counts(strength, [B.thin(edge)], B.thresholds(5), rng=None)
    assert B.collect([counts])["ods"]["f"] > 0.9
