"""The field route (apm.field): a student solved in closed form over many photographs, and per image
its answers scaled per level plus the interpolation of what they missed at the passes' cells."""

import numpy as np
import pytest
import torch
from scipy.ndimage import map_coordinates
from sklearn.linear_model import Ridge

from apm import field, offgrid
from apm.errors import ConfigError
from apm.perceive import FitRecipe, fit_images, fitted_module
from apm.students.apm import APMStudent
from teachers.base import Level
from tests.test_field import PATCH, SIZE, edges_photo, field_module, patch_means, rgb_offgrid


def lattice_passes(photo: torch.Tensor) -> list[offgrid.MovedPass]:
    return offgrid.moved_passes(patch_means, offgrid.pad_canvas(photo, PATCH), SIZE, offgrid.lattice(4, PATCH))


def tiny_student(window: int = 0) -> APMStudent:
    torch.manual_seed(0)
    return APMStudent([Level("rgb", (8, 8), 3)], SIZE, PATCH, pe_dim=16, level_dim=0, hidden_dims=[32],
                      pe_max_freq=4, pixel_window=window).eval()


def test_the_field_answers_the_teacher_at_the_fitted_cells_and_interpolates_its_residual_between():
    photo = edges_photo(0)
    passes = lattice_passes(photo)
    st = tiny_student()
    fit = field.fit_field(st, photo, passes, [0])
    g = fit.gains[0]
    assert 0 <= g <= 1
    st.lattice = fit.lattice
    with torch.no_grad():
        for p in passes:  # the teacher itself at every fitted cell
            torch.testing.assert_close(st.query(photo, 0, p.coords[0]), p.features[0].flatten(1, 2), atol=1e-5, rtol=1e-5)
        coords = torch.rand(50, 2, generator=torch.Generator().manual_seed(1)) * 0.8 + 0.1
        got = st.query(photo, 0, coords)
        st.lattice = None
        base = st.query(photo, 0, coords)
    # by hand: the 4 passes' residuals on one 16 x 16 lattice 7 px apart (centres at 7, 14, ... px)
    fine = np.zeros((16, 16, 3))
    for p in passes:
        dy, dx = p.offset
        with torch.no_grad():
            res = p.features[0][0] - g * st.query(photo, 0, p.coords[0])[0].view(8, 8, 3)
        fine[dy // 7 :: 2, dx // 7 :: 2] = res.numpy()
    at = (coords.numpy() * SIZE - 7) / 7  # lattice index units
    want = np.stack([map_coordinates(fine[..., c], at.T, order=1, mode="nearest") for c in range(3)], -1)
    np.testing.assert_allclose(got[0].numpy(), g * base[0].numpy() + want, atol=1e-5)


def test_the_gain_is_the_held_out_least_squares_one_and_stays_in_zero_one():
    photo = edges_photo(1)
    target = lattice_passes(photo)
    noise = torch.Generator().manual_seed(2)
    like = lambda scale, extra: [offgrid.MovedPass(p.offset, [scale * p.features[0] + extra * torch.randn(  # noqa: E731
        p.features[0].shape, generator=noise)], p.coords) for p in target]
    assert field.gain(target, like(1.0, 0.0), 0) == pytest.approx(1.0, abs=1e-6)
    assert field.gain(target, like(-1.0, 0.0), 0) == 0.0  # clamped
    base = like(0.5, 0.05)
    g = field.gain(target, base, 0)
    # brute force over the gain: the held-out error of the unmoved pass's residual, interpolated
    def err(gg):
        r0 = target[0].features[0] - gg * base[0].features[0]
        return sum(float((t.features[0].flatten(1, 2) - gg * b.features[0].flatten(1, 2)
                          - offgrid.bilinear_at(r0, t.coords[0])).square().sum()) for t, b in zip(target[1:], base[1:]))
    grid = np.linspace(0, 1, 1001)
    assert g == pytest.approx(grid[np.argmin([err(x) for x in grid])], abs=2e-3)
    held = torch.cat([t.features[0].flatten(1, 2) for t in target[1:]], 1)  # the held-out R^2 by hand
    sst = float((held - held.mean(1, keepdim=True)).square().sum())
    assert field.heldout_r2(target, base, 0, g) == pytest.approx(1 - err(g) / sst, abs=1e-5)


def test_the_pooled_head_solve_is_sklearns_ridge_whatever_the_batches():
    g = torch.Generator().manual_seed(0)
    h, f = torch.rand(300, 20, generator=g), torch.randn(300, 4, generator=g)
    solve = field.HeadSolve(ridge=0.05)
    for part in (slice(0, 100), slice(100, 300)):
        solve.add("grid", h[part], {0: f[part], 1: 2 * f[part]})
    weight, bias = solve.solve(0)
    hc = h.double() - h.double().mean(0)
    lam = 0.05 * float(hc.square().sum()) / len(h)
    ref = Ridge(alpha=lam).fit(h.double().numpy(), f.double().numpy())
    np.testing.assert_allclose(weight.numpy(), ref.coef_, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bias.numpy(), ref.intercept_, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(solve.solve(1)[0].numpy(), 2 * ref.coef_, rtol=1e-4, atol=1e-5)


def test_the_field_route_refuses_what_it_would_ignore_and_defaults_to_four_passes():
    assert FitRecipe(field=True).passes == 4
    assert FitRecipe(field=True, passes=9).passes == 9
    for other in ({"solve_heads": True}, {"moves": "heads"}, {"protocol": "official"}, {"init": "fresh"}):
        with pytest.raises(ConfigError, match="--field"):
            FitRecipe(field=True, **other)


@pytest.mark.slow
def test_a_solved_field_that_sees_the_pixels_beats_bilinear_off_the_grid(tmp_path):
    """The rgb level (each patch's mean colour) of unseen photographs with edges inside cells: a
    student solved on others, fitted by the field route on 4 passes, answers between the cells far
    better than bilinear interpolation of the same passes; without evidence at the query point,
    the same route is no better than that interpolation."""
    train = torch.cat([edges_photo(s) for s in range(10, 22)])
    results = {}
    for window in (14, 0):
        torch.manual_seed(0)
        module = field_module(tmp_path, pixel_window=window, pixel_spacing=1.0, hidden_dims=[512], level_dim=0).eval()
        field.solve_field(module, train.split(4), passes=4, ridge=1e-3)
        scores = []
        for seed in (0, 1):
            photo = edges_photo(seed)
            fitted = fit_images(module, photo, [seed], FitRecipe(field=True), progress=False)[0]
            assert fitted.steps == 1 and fitted.lattice is not None
            assert fitted.r2_after["rgb"] > 0.999  # the teacher at the fitted cells
            scores.append(rgb_offgrid(module, fitted, photo))
        results[window] = np.mean(scores, axis=0)
    field_r2, bilinear = results[14]
    assert field_r2 > bilinear + 0.15, results
    assert results[0][0] < bilinear + 0.05, results


def test_perceive_field_writes_a_student_that_every_tool_loads_with_its_lattice(tmp_path):
    from apm.cli import load_student, main

    torch.manual_seed(0)
    module = field_module(tmp_path, pixel_window=5, pixel_spacing=2.0, hidden_dims=[64], level_dim=0).eval()
    field.solve_field(module, [edges_photo(5)], passes=4, ridge=1e-2)
    from apm.checkpoints import write_student

    write_student(module, tmp_path / "solved.ckpt")
    out = tmp_path / "out"
    assert main(["perceive", "--ckpt", str(tmp_path / "solved.ckpt"), "--images", "skimage:coffee",
                 "--out", str(out), "--field", "--figures", "none"]) == 0
    import json

    line = json.loads((out / "perceive.jsonl").read_text().splitlines()[0])
    assert line["field"] is True and line["passes"] == 4 and line["steps"] == 1
    assert set(line["r2_heldout"]) == {l.name for l in module.levels}
    loaded = load_student(str(out / "coffee.ckpt"), device="cpu")
    assert loaded.student.lattice is not None
    photo = edges_photo(6)
    fitted = fit_images(module, photo, [0], FitRecipe(field=True), progress=False)[0]
    st = fitted_module(module, fitted)
    path = tmp_path / "fitted.ckpt"
    write_student(st, path)
    again = load_student(str(path), device="cpu")
    coords = torch.rand(30, 2)
    with torch.no_grad():
        for lvl in range(len(module.levels)):
            torch.testing.assert_close(again.query_features(lvl, coords, photo), st.query_features(lvl, coords, photo))
        assert not torch.allclose(again.query_features(0, coords, photo), module.query_features(0, coords, photo))


def detail_r2(module, images: torch.Tensor) -> float:
    """R^2 of the student's detail between the cells of 4 lattice passes (its answers at the cells of
    passes moved by (3, 10) and (10, 3) px, minus their bilinear interpolation from its answers at
    the lattice's cells) against the teacher's same detail, on the teacher's scale."""
    size, scores = images.shape[-1], []
    lattice = offgrid.lattice_passes(module, images, 4)
    truth = offgrid.moved_passes(module.targets, offgrid.pad_canvas(images, PATCH), size, [(3, 10), (10, 3)])
    for lvl in range(len(module.levels)):
        ask = lambda c: module.standardizer.decode(lvl, module.student.query(images, lvl, c))  # noqa: E731
        own = [offgrid.MovedPass(p.offset, [None] * lvl + [ask(p.coords[lvl]).view_as(p.features[lvl])],
                                 [None] * lvl + [p.coords[lvl]]) for p in lattice]
        feats, coords = offgrid.stitch(truth, lvl)
        want = feats - offgrid.lattice_bilinear_at(lattice, lvl, coords)
        got = ask(coords) - offgrid.lattice_bilinear_at(own, lvl, coords)
        scores.append(float(offgrid.scores(got, want).mean()))
    return min(scores)


def test_apm_solve_writes_a_checkpoint_whose_heads_answer_the_teachers_detail(tmp_path, capsys):
    """By default the heads answer what the field uses: the teacher's detail between the lattice's
    cells; ``--heads features`` answers its features at the cells."""
    from apm.cli import load_student, main
    from apm.data import read_images
    from tests.conftest import CONFIGS

    overlay = tmp_path / "size.yaml"
    overlay.write_text(f"data:\n  image_size: {SIZE}\nmodel:\n  student:\n    init_args:\n      "
                       f"hidden_dims: [64]\n      level_dim: 0\n      pixel_window: 5\n")
    configs = ["--config", str(CONFIGS / "apm.yaml"), "--config", str(CONFIGS / "smoke.yaml"), "--config", str(overlay)]
    photos = "skimage:astronaut,coffee,chelsea"
    images = torch.stack([p.image for p in read_images([photos], SIZE)])
    r2 = {}
    for heads, setting in (("detail", ["--extra", "12"]), ("features", ["--ridge", "1e-3"])):
        ckpt = tmp_path / f"{heads}.ckpt"
        assert main(["solve", *configs, "--images", photos, "--out", str(ckpt), "--heads", heads, *setting]) == 0
        assert "3 photographs x 4 passes" in capsys.readouterr().out
        module = load_student(str(ckpt), device="cpu")
        with torch.no_grad():
            preds, feats = module.predict_features(images), module.targets(images)
            r2[heads] = (detail_r2(module, images), min(float(offgrid.scores(p.flatten(1, 2), f.flatten(1, 2)).mean())
                                                        for p, f in zip(preds, feats)))
    assert r2["detail"][0] > 0.08 and r2["features"][0] < 0, r2  # (0.12 and -4.2 when written)
    assert r2["features"][1] > 0.3, r2  # a fresh random student's heads give about 0 or below
    assert main(["solve", "--config", str(CONFIGS / "apm.yaml"), "--images", "skimage:coffee",
                 "--out", str(tmp_path / "x.ckpt"), "--ridge", "0"]) != 0
    assert "Setting '--ridge'" in capsys.readouterr().err
