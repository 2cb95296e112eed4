"""Routes to perceiving a new image in few steps (``FitRecipe.moves`` and ``solve_heads``), with a
smoke student distilled on two photographs and fitted to one it never saw."""

import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge

from apm.cli import main
from apm.errors import ConfigError
from apm.cli import load_student
from apm.data import load_images
from apm.module import APMModule
from apm.perceive import ROUTE, FitRecipe, fit_images, fitted_module, ridge_readout
from tests.test_perceive import UNSEEN, smoke_fit, unseen

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return smoke_fit(tmp_path_factory.mktemp("distilled"), 100)


@pytest.mark.parametrize("n, k", [(20, 50), (80, 12)])  # the dual (n <= k) and the primal form
def test_ridge_readout_is_sklearns_ridge(n, k):
    g = torch.Generator().manual_seed(0)
    h, z = torch.randn(3, n, k, generator=g) * 2 + 1, torch.randn(3, n, 5, generator=g)
    weight, bias = ridge_readout(h, z, 0.05)
    assert weight.shape == (3, 5, k) and bias.shape == (3, 5)
    for b in range(3):
        lam = 0.05 * float(((h[b] - h[b].mean(0)) ** 2).sum()) / n
        ref = Ridge(alpha=lam, fit_intercept=True, solver="cholesky").fit(h[b].double().numpy(), z[b].double().numpy())
        np.testing.assert_allclose(weight[b].numpy(), ref.coef_, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(bias[b].numpy(), ref.intercept_, rtol=1e-6, atol=1e-8)
    # a level of one location (a global embedding): the head answers its target exactly
    w1, b1 = ridge_readout(h[:, :1], z[:, :1], 0.05)
    assert torch.allclose(w1, torch.zeros_like(w1)) and torch.allclose(b1, z[:, 0].double())


def r2_after(module, recipe: FitRecipe, steps: int) -> float:
    (res,) = fit_images(module, unseen()[None], [0], FitRecipe(**{**vars(recipe), "max_steps": steps,
                                                                   "target_r2": 2.0}), progress=False)
    return float(np.mean(list(res.r2_after.values())))


def test_solved_heads_perceive_an_unseen_photograph_in_one_step(trained):
    """The distilled student's last hidden activations are a basis its heads can be solved on:
    one closed-form step fits the unseen photograph far better than a gradient step from the
    distilled or a fresh student. A solve with a wrong transpose, bias or scale fails this."""
    module = load_student(str(trained), device=CPU)
    hp = {k: v for k, v in module.hparams.items() if not k.startswith("_")}
    solve = FitRecipe(solve_heads=True, moves="code+heads")
    one_step = r2_after(module, solve, 1)
    warm = r2_after(module, FitRecipe(), 1)
    cold = r2_after(APMModule(**hp).eval(), FitRecipe(init="fresh"), 1)
    assert one_step > 0.7 and one_step > max(warm, cold) + 0.5, (one_step, warm, cold)
    # moving the code and the heads on from there keeps what the solve found
    assert r2_after(module, solve, 15) > one_step - 0.02


def test_variable_projection_moves_the_body_under_always_solved_heads(trained):
    """Re-solving the heads after every gradient step of the rest (``resolve_every=1``) keeps
    gaining where the one-off solve stalls (moving only code and heads) or is undone (moving the
    body under the first solution's heads). A re-solve skipped, or applied before the step rather
    than after it, fails this. A large ridge penalty leaves room to gain."""
    module = load_student(str(trained), device=CPU)
    base = dict(solve_heads=True, ridge=1e-2)
    varpro = r2_after(module, FitRecipe(**base, moves="body", resolve_every=1), 10)
    stalled = r2_after(module, FitRecipe(**base, moves="code+heads"), 10)
    undone = r2_after(module, FitRecipe(**base, moves="body"), 10)
    once = r2_after(module, FitRecipe(**base), 1)
    assert varpro > 0.85 and varpro > max(stalled, undone, once) + 0.08, (varpro, stalled, undone, once)
    with pytest.raises(ConfigError, match="--resolve-every"):
        FitRecipe(resolve_every=1)  # without --solve-heads


@pytest.mark.parametrize("moves, moved", [("code", "first.bias"), ("heads", "heads."),
                                          ("code+heads", "first.bias heads."), ("body", "column. first. trunk. level_embed.")])
def test_fitting_part_of_the_student_leaves_the_rest_bit_for_bit(trained, moves, moved):
    module = load_student(str(trained), device=CPU)
    start = {n: p.detach().clone() for n, p in module.student.named_parameters()}
    (res,) = fit_images(module, unseen()[None], [0], FitRecipe(moves=moves, max_steps=8, eval_every=4,
                                                               target_r2=2.0), progress=False)
    prefixes = tuple(moved.split())
    changed = {n for n in start if not torch.equal(res.params[n], start[n])}
    assert changed == {n for n in start if n.startswith(prefixes)}, changed
    assert res.r2_after != res.r2_before and np.mean(list(res.r2_after.values())) > np.mean(list(res.r2_before.values()))
    # the student it came from is untouched too
    assert all(torch.equal(p, start[n]) for n, p in module.student.named_parameters())


def test_solved_route_batched_equals_one_image_at_a_time(trained):
    module = load_student(str(trained), device=CPU)
    images = torch.stack([img for _, img in load_images(["skimage:chelsea,coffee"], 224)])
    recipe = FitRecipe(solve_heads=True, moves="code+heads", max_steps=4, eval_every=2, target_r2=2.0)
    batch = fit_images(module, images, [3, 4], recipe, progress=False)
    alone = fit_images(module, images[1:2], [4], recipe, progress=False)[0]
    assert [s for s, _ in alone.curve] == [0, 1, 2, 4]
    assert [r for _, r in alone.curve] == pytest.approx([r for _, r in batch[1].curve], abs=2e-3)
    got = fitted_module(module, batch[1]).predict_features(images[1:2])
    want = fitted_module(module, alone).predict_features(images[1:2])
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=5e-3 * w.abs().max().item())


def test_perceive_command_takes_a_route_and_refuses_to_resume_with_another(trained, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["perceive", "--ckpt", str(trained), "--images", UNSEEN, "--out", str(out), "--figures", "none",
            "--max-steps", "20", "--eval-every", "5"]
    assert main([*args, "--solve-heads", "--moves", "code+heads"]) == 0
    (line,) = [json.loads(x) for x in (out / "perceive.jsonl").read_text().splitlines()]
    assert line["moves"] == "code+heads" and line["solve_heads"] is True and line["steps"] <= 5
    assert line["r2_mean_after"] > 0.7, line
    assert main([*args, "--moves", "heads"]) == 2
    assert "moves" in capsys.readouterr().err
    # a log from before the routes existed (no route keys) was run with the default route: a
    # default rerun resumes it, a route does not
    old = tmp_path / "old"
    old.mkdir()
    legacy = {k: v for k, v in line.items() if k not in ROUTE}
    (old / "perceive.jsonl").write_text(json.dumps(legacy) + "\n")
    again = ["perceive", "--ckpt", str(trained), "--images", UNSEEN, "--out", str(old), "--figures", "none",
             "--max-steps", "20", "--eval-every", "5"]
    assert main([*again, "--solve-heads", "--moves", "code+heads"]) == 2
    capsys.readouterr()
    assert main(again) == 0 and "skipping 1 image" in capsys.readouterr().out


def test_routes_the_official_recipe_or_the_student_cannot_take_are_named(trained):
    with pytest.raises(ConfigError, match="--solve-heads"):
        FitRecipe(protocol="official", solve_heads=True)
    with pytest.raises(ConfigError, match="--moves"):
        FitRecipe(moves="everything")
    module = load_student(str(trained), device=CPU)
    module.student.first.bias = None  # a student with no first-layer bias has no code to fit
    with pytest.raises(ConfigError, match="--moves code"):
        fit_images(module, unseen()[None], [0], FitRecipe(moves="code", max_steps=1), progress=False)
