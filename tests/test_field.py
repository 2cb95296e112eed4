"""The student as a field: the teacher's truth between its cells (apm.offgrid), evidence at the
query point (pixel_window), distillation toward moved passes and fitting on several passes."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from scipy.ndimage import map_coordinates

from apm import offgrid
from apm.errors import ConfigError
from apm.cli import module_from_configs
from apm.perceive import FitRecipe, fit_images, fitted_module
from apm.students.apm import APMStudent
from teachers.base import IMAGENET_MEAN, IMAGENET_STD, Level
from tests.conftest import CONFIGS

PATCH, SIZE = 14, 112


def field_module(tmp_path, subpatch_moves: bool = False, feature_cache: str | None = None, **student):
    """A fresh smoke module at SIZE px with the given student settings."""
    overlay = tmp_path / "size.yaml"
    overlay.write_text(f"data:\n  image_size: {SIZE}\n")
    model = {"student": student, "subpatch_moves": subpatch_moves, "feature_cache": feature_cache}
    return module_from_configs([CONFIGS / "apm.yaml", CONFIGS / "smoke.yaml", overlay], model)


def patch_means(images: torch.Tensor) -> list[torch.Tensor]:
    """A 'teacher' whose one level is each 14-px patch's mean colour: (B, h, w, 3)."""
    return [rearrange(F.avg_pool2d(images, PATCH), "b c h w -> b h w c")]


def test_moved_passes_give_the_hand_computed_patch_means_where_the_moved_cells_sit():
    canvas = torch.rand(2, 3, SIZE + PATCH, SIZE + PATCH, generator=torch.Generator().manual_seed(0))
    offsets = [(0, 0), (3, 11), (7, 7), (13, 1)]
    passes = offgrid.moved_passes(patch_means, canvas, SIZE, offsets)
    c = canvas.numpy()
    for p, (dy, dx) in zip(passes, offsets):
        assert p.offset == (dy, dx)
        feats, coords = p.features[0].numpy(), p.coords[0].numpy()
        for i, j in [(0, 0), (2, 5), (7, 7), (5, 1)]:
            y0, x0 = PATCH * i + dy, PATCH * j + dx  # the moved patch's pixels in the canvas
            want = c[:, :, y0 : y0 + PATCH, x0 : x0 + PATCH].mean(axis=(2, 3))
            np.testing.assert_allclose(feats[:, i, j], want, rtol=1e-5, atol=1e-6)
            # its centre, in the unmoved frame's [0, 1] coordinates
            np.testing.assert_allclose(coords[i * 8 + j], [(y0 + 7) / SIZE, (x0 + 7) / SIZE], atol=1e-6)


def test_moved_passes_of_a_frame_that_is_not_square_sit_where_their_patches_are():
    """A photograph at its own aspect (full resolution): the rows' coordinates are divided by its
    height, the columns' by its width."""
    height, width = SIZE, SIZE + 2 * PATCH
    canvas = torch.rand(1, 3, height + PATCH, width + PATCH, generator=torch.Generator().manual_seed(1))
    offsets = [(0, 0), (7, 7), (2, 12)]
    passes = offgrid.moved_passes(patch_means, canvas, (height, width), offsets)
    c = canvas.numpy()
    for p, (dy, dx) in zip(passes, offsets):
        assert p.features[0].shape == (1, height // PATCH, width // PATCH, 3)
        for i, j in [(0, 9), (7, 0), (3, 4)]:
            y0, x0 = PATCH * i + dy, PATCH * j + dx
            want = c[:, :, y0 : y0 + PATCH, x0 : x0 + PATCH].mean(axis=(2, 3))
            np.testing.assert_allclose(p.features[0][:, i, j].numpy(), want, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(p.coords[0][i * (width // PATCH) + j], [(y0 + 7) / height, (x0 + 7) / width],
                                       atol=1e-6)


def test_windows_past_the_canvas_are_refused_and_mirrored_canvases_reflect():
    frame = torch.rand(1, 3, SIZE, SIZE)
    with pytest.raises(ValueError, match="canvas of at least"):
        offgrid.window(frame, SIZE, 1, 0)
    canvas = offgrid.pad_canvas(frame, 5)
    assert canvas.shape[-2:] == (SIZE + 5, SIZE + 5)
    torch.testing.assert_close(canvas[..., :SIZE, :SIZE], frame)
    torch.testing.assert_close(canvas[..., SIZE, :SIZE], frame[..., SIZE - 2, :])  # reflection


def ramp_passes(offsets):
    """Passes of a 'teacher' whose level is its patch's mean (y, x) pixel position: exactly linear
    in the cell's centre, so bilinear interpolation from any passes must answer it exactly."""
    yy, xx = torch.meshgrid(torch.arange(SIZE + PATCH) + 0.5, torch.arange(SIZE + PATCH) + 0.5, indexing="ij")
    canvas = torch.stack([yy, xx, yy + xx])[None].float()
    return offgrid.moved_passes(patch_means, canvas, SIZE, offsets)


@pytest.mark.parametrize("passes", [1, 4, 16])
def test_bilinear_from_lattice_passes_is_exact_on_a_linear_field(passes):
    lattice = ramp_passes(offgrid.lattice(passes, PATCH))
    truth = ramp_passes(offgrid.EVAL_OFFSETS)
    for p in truth:
        keep = offgrid.inside((8, 8), SIZE, SIZE - PATCH, p.offset)  # away from the clamped border
        coords = p.coords[0][keep]
        got = offgrid.lattice_bilinear_at(lattice, 0, coords) if passes > 1 else \
            offgrid.bilinear_at(lattice[0].features[0], coords)
        want = rearrange(p.features[0], "b h w d -> b (h w) d")[:, keep]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-3)
        # nearest cell is off by up to half a cell: not exact, as it should not be
        assert (offgrid.nearest_at(lattice[0].features[0], coords) - want).abs().max() > 3


def test_lattice_must_be_square():
    assert offgrid.lattice(4, 14) == [(0, 0), (0, 7), (7, 0), (7, 7)]
    with pytest.raises(ValueError, match="square"):
        offgrid.lattice(3, 14)


def test_evidence_is_the_normalized_pixels_around_the_query_at_any_coordinate():
    levels = [Level("a", (8, 8), 5)]
    st = APMStudent(levels, SIZE, PATCH, pe_dim=16, level_dim=4, hidden_dims=[8], pe_max_freq=4,
                    pixel_window=14, pixel_spacing=1.0)
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    mean, std = np.array(IMAGENET_MEAN)[:, None, None], np.array(IMAGENET_STD)[:, None, None]
    norm = (images.numpy() - mean) / std
    # at a cell centre the window is exactly that patch's pixels
    ev = st.evidence(images, torch.tensor([[(2 + 0.5) / 8, (5 + 0.5) / 8]]))  # (2, 1, 3*196)
    want = norm[:, :, 28:42, 70:84].reshape(2, -1)
    np.testing.assert_allclose(ev[:, 0].numpy(), want, rtol=1e-4, atol=1e-5)
    # anywhere inside: bilinear interpolation of the pixel centres (scipy's, independently)
    y, x = 37.3, 51.8  # continuous pixel position (pixel i spans [i, i+1))
    ev = st.evidence(images, torch.tensor([[y / SIZE, x / SIZE]]))
    offs = np.arange(14) - 6.5
    gy, gx = np.meshgrid(y - 0.5 + offs, x - 0.5 + offs, indexing="ij")
    for b in range(2):
        for ch in range(3):
            got = ev[b, 0].reshape(3, 14, 14)[ch].numpy()
            np.testing.assert_allclose(got, map_coordinates(norm[b, ch], [gy, gx], order=1), rtol=1e-4, atol=1e-5)


def test_a_student_with_evidence_answers_queries_the_same_in_every_path():
    levels = [Level("a", (8, 8), 5), Level("b", (4, 4), 3)]
    st = APMStudent(levels, SIZE, PATCH, pe_dim=16, level_dim=4, hidden_dims=[16, 16], pe_max_freq=4,
                    level_entry="late", pixel_window=5, pixel_spacing=2.0).eval()
    images = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        dense = st.dense(images)
        fwd = st(images, [None, None])
        coords = st.coords(0)
        plain = st.decode(0, st.first(st.query_vectors(st.trigger(images), 0, coords, images)))
        q = st.query(images, 0, coords, chunk=7)
        streamed = st.predict_queries(images, torch.zeros(64, dtype=torch.long), coords, chunk=9)[0]
    for got in (rearrange(fwd[0], "b (h w) d -> b h w d", h=8), rearrange(plain, "b (h w) d -> b h w d", h=8),
                rearrange(q, "b (h w) d -> b h w d", h=8), rearrange(streamed, "b (h w) d -> b h w d", h=8)):
        torch.testing.assert_close(got, dense[0], rtol=1e-4, atol=1e-5)


def edges_photo(seed: int, block: int = 3) -> torch.Tensor:
    """(1, 3, SIZE, SIZE): random flat colours on a lattice of ``block``-px squares, offset from the
    14-px cells, so every cell has edges inside it (bilinear from 4 passes scores R^2 about 0.7
    on its patch means off the grid)."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(1, 3, SIZE // block + 2, SIZE // block + 2, generator=g)
    return F.interpolate(small, scale_factor=block, mode="nearest")[..., 1 : SIZE + 1, 2 : SIZE + 2]


def rgb_offgrid(module, fitted, photo) -> tuple[float, float]:
    """Off-grid R^2 of the fitted field and of bilinear from 4 passes, on the rgb level."""
    canvas = offgrid.pad_canvas(photo, PATCH)
    truth = offgrid.moved_passes(patch_means, canvas, SIZE, offgrid.EVAL_OFFSETS)
    lattice = offgrid.moved_passes(patch_means, canvas, SIZE, offgrid.lattice(4, PATCH))
    feats, coords = offgrid.stitch(truth, 0)
    keep = (coords <= 1 - PATCH / SIZE).all(1)  # no mirrored pixel under the truth
    feats, coords = feats[:, keep], coords[keep]
    rgb = len(module.levels) - 1
    st = fitted_module(module, fitted)
    with torch.no_grad():
        pred = st.standardizer.decode(rgb, st.student.query(photo, rgb, coords))
    bil = offgrid.lattice_bilinear_at(lattice, 0, coords)
    return float(offgrid.scores(pred, feats)[0]), float(offgrid.scores(bil, feats)[0])


@pytest.mark.slow
def test_a_field_with_evidence_beats_bilinear_off_the_grid_and_one_without_does_not(tmp_path):
    """The rgb level (each patch's mean colour) of a photograph with edges inside cells: fitted on
    4 passes, a field that sees the pixels at its query point answers between the cells far
    better than interpolating the same 4 passes; the paper's query (position code only) cannot."""
    photo = edges_photo(0)
    results = {}
    for window in (7, 0):
        torch.manual_seed(0)
        module = field_module(tmp_path, pixel_window=window, pixel_spacing=2.0, hidden_dims=[128, 128])
        recipe = FitRecipe(init="fresh", levels=["rgb"], passes=4, max_steps=400, target_r2=0.9999,
                           queries_per_image=0, lr=3e-3)
        fitted = fit_images(module, photo, [0], recipe, progress=False)[0]
        results[window] = rgb_offgrid(module, fitted, photo)
    field, bilinear = results[7]  # measured: 0.89 against 0.69
    assert field > bilinear + 0.15, results
    assert results[0][0] < bilinear + 0.15, results  # measured: 0.68


def test_fitting_on_moved_passes_runs_every_route_and_refuses_a_non_square_count(tmp_path):
    torch.manual_seed(0)
    module = field_module(tmp_path, pixel_window=7, pixel_spacing=2.0)
    photo = edges_photo(1)
    for route in ({}, {"solve_heads": True, "moves": "body", "resolve_every": 1}):
        recipe = FitRecipe(init="fresh", passes=4, max_steps=3, target_r2=2.0, **route)
        fitted = fit_images(module, photo, [0], recipe, progress=False)[0]
        assert fitted.steps == 3 and set(fitted.r2_after) == {l.name for l in module.levels}
    with pytest.raises(ConfigError, match="--passes"):
        FitRecipe(passes=3)


def test_offgrid_scores_match_an_independent_bilinear_and_the_eval_command_reports_them(tmp_path):
    torch.manual_seed(0)
    module = field_module(tmp_path, pixel_window=7, pixel_spacing=2.0).eval()
    photo = edges_photo(2, block=5)
    res = offgrid.offgrid_scores(module, photo, [0, len(module.levels) - 1], passes=4)
    assert set(res) == {module.levels[0].name, "rgb"}
    assert set(res["rgb"]) == set(offgrid.PREDICTORS)
    # the rgb level's truth is each moved patch's mean colour: bilinear from one pass by hand (scipy)
    means = F.avg_pool2d(photo, PATCH)[0].numpy()  # (3, 8, 8)
    canvas = F.pad(photo, (0, PATCH, 0, PATCH), mode="reflect")
    truth, pred = [], []
    for dy, dx in offgrid.EVAL_OFFSETS:
        for i in range(8):
            for j in range(8):
                if PATCH * (i + 1) + dy > SIZE or PATCH * (j + 1) + dx > SIZE:
                    continue  # a mirrored pixel under the cell
                y0, x0 = PATCH * i + dy, PATCH * j + dx
                truth.append(canvas[0, :, y0 : y0 + PATCH, x0 : x0 + PATCH].mean((1, 2)).numpy())
                cy, cx = i + dy / PATCH, j + dx / PATCH  # in cell units, centres at integers
                pred.append([map_coordinates(means[c], [[cy], [cx]], order=1, mode="nearest")[0] for c in range(3)])
    truth, pred = np.array(truth), np.array(pred)
    want = 1 - ((pred - truth) ** 2).sum() / ((truth - truth.mean(0)) ** 2).sum()
    assert res["rgb"]["bilinear"][0] == pytest.approx(want, abs=1e-4)
    assert res["rgb"]["ceiling"][0] == pytest.approx(1.0, abs=1e-6)  # a patch mean is the same wherever the grid is


def test_subpatch_moves_pair_each_image_with_its_own_moved_cells_and_a_real_fit_runs(tmp_path):
    from apm.cli import main

    module = field_module(tmp_path, pixel_window=7, pixel_spacing=2.0, subpatch_moves=True)
    images = torch.stack([edges_photo(s, block=5)[0] for s in range(3)])
    feats, points = offgrid.moved_targets(module.targets, images, PATCH)
    rgb = len(module.levels) - 1
    canvas = F.pad(images, (0, PATCH - 1, 0, PATCH - 1), mode="reflect")
    for b in range(3):
        dy, dx = (points[rgb][b, 0] * SIZE - PATCH / 2).round().long().tolist()  # cell (0, 0)'s centre
        assert 0 <= dy < PATCH and 0 <= dx < PATCH
        for i, j in [(0, 0), (3, 6), (7, 7)]:
            y0, x0 = PATCH * i + dy, PATCH * j + dx
            want = canvas[b, :, y0 : y0 + PATCH, x0 : x0 + PATCH].mean((1, 2))
            torch.testing.assert_close(feats[rgb][b, i, j], want, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(points[rgb][b, i * 8 + j], torch.tensor([y0 + 7, x0 + 7]) / SIZE)
    overlay = tmp_path / "size.yaml"
    assert main(["fit", "-c", str(CONFIGS / "apm.yaml"), "-c", str(CONFIGS / "smoke.yaml"), "-c", str(overlay),
                 "--model.student.pixel_window", "7", "--model.student.pixel_spacing", "2",
                 "--model.subpatch_moves", "true",
                 "--data.images", "skimage:astronaut,coffee", "--data.val_fraction", "0",
                 "--trainer.max_steps", "3", "--trainer.default_root_dir", str(tmp_path / "run"),
                 "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                 "--trainer.callbacks", "lightning.pytorch.callbacks.ModelCheckpoint",
                 "--trainer.callbacks.save_last", "true", "--trainer.callbacks.save_top_k", "0"]) == 0
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_subpatch_moves_refuse_the_feature_cache(tmp_path):
    with pytest.raises(ConfigError, match="subpatch_moves"):
        field_module(tmp_path, subpatch_moves=True, feature_cache=str(tmp_path / "cache"))


def test_apm_segment_reads_the_route_options_as_perceive_does(tmp_path, capsys):
    from apm.cli import main

    base = ["segment", "--config", str(CONFIGS / "apm.yaml"), "--config", str(CONFIGS / "smoke.yaml"),
            "--images", "skimage:astronaut", "--gt", str(tmp_path), "--json", str(tmp_path / "s.json")]
    assert main([*base, "--solve-heads"]) == 2
    assert "'--solve-heads' (needs --perceive)" in capsys.readouterr().err
    assert main([*base, "--perceive", "--passes", "3"]) == 2  # the recipe gets the route: refused there
    assert "Setting '--passes': 3" in capsys.readouterr().err
    assert main([*base, "--perceive", "--ridge", "0.1"]) == 2
    assert "does nothing without it" in capsys.readouterr().err
