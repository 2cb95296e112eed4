"""apm perceive, test-time fitting and the Python API, with a tiny random DINOv2 and real photographs."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from einops import rearrange

from apm import APM
from apm.cli import load_student
from apm.data import load_images
from apm.cli import main
from apm.codes import grid_coords
from apm.data import skimage_photo
from apm.errors import ConfigError
from apm.module import APMModule
from apm.perceive import FitRecipe, fit_images, fitted_module
from teachers import create_teacher
from tests.conftest import CONFIGS, ROOT

TRAIN = "skimage:astronaut,coffee"
UNSEEN = "skimage:chelsea"
CPU = torch.device("cpu")


def smoke_fit(root: Path, steps: int, *extra: str) -> Path:
    assert main(["fit", "-c", str(CONFIGS / "apm.yaml"), "-c", str(CONFIGS / "smoke.yaml"),
                 "--data.images", TRAIN, "--data.val_fraction", "0", "--trainer.max_steps", str(steps),
                 "--trainer.default_root_dir", str(root), "--trainer.logger", "false",
                 "--trainer.callbacks", "lightning.pytorch.callbacks.ModelCheckpoint",
                 "--trainer.callbacks.save_last", "true", "--trainer.callbacks.save_top_k", "0",
                 "--trainer.enable_progress_bar", "false", *extra]) == 0
    return root / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A smoke student distilled on two photographs (chelsea is not one of them)."""
    return smoke_fit(tmp_path_factory.mktemp("distilled"), 100)


def unseen(size: int = 224) -> torch.Tensor:
    return load_images([UNSEEN], size)[0][1]


def test_perceive_command_fits_an_unseen_photograph_and_its_student_reloads(trained, tmp_path, capsys, caplog):
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="apm"):
        assert main(["perceive", "--ckpt", str(trained), "--images", UNSEEN, str(tmp_path / "missing.png"),
                     str(corrupt), "--out", str(out), "--max-steps", "60", "--eval-every", "10"]) == 0
    said = " ".join(caplog.messages)
    assert "missing.png" in said and "broken.jpg" in said and "2 image file(s) were skipped" in said
    (line,) = [json.loads(x) for x in (out / "perceive.jsonl").read_text().splitlines()]
    assert line["image"] == "chelsea" and line["init"] == "trained" and line["protocol"] == "ours"
    assert line["r2_mean_after"] >= line["r2_mean_before"] + 0.2, line
    assert set(line["r2_after"]) == set(line["ari_after"]) == {"block1", "block2", "block3", "rgb"}
    for key in ("figure_before", "figure_after", "ckpt"):
        assert Path(line[key]).is_file()
    # the fitted student reloads through the tools' loader and scores what the fit recorded,
    # measured here on the teacher's scale by a separate code path
    module = load_student(line["ckpt"], device=CPU)
    r2 = module.evaluate(unseen()[None])
    for name, value in line["r2_after"].items():
        assert r2[name]["r2"].item() == pytest.approx(value, abs=1e-4)
    # a rerun skips the finished image
    capsys.readouterr()
    assert main(["perceive", "--ckpt", str(trained), "--images", UNSEEN, "--out", str(out), "--max-steps",
                 "60", "--eval-every", "10"]) == 0
    assert "skipping 1 image" in capsys.readouterr().out
    assert len((out / "perceive.jsonl").read_text().splitlines()) == 1


def test_perceive_fits_only_the_chosen_levels(trained, tmp_path, capsys):
    from teachers.base import Teacher

    out = tmp_path / "out"
    calls = []  # the teacher runs once per image: fit, scores and figures share its features
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: calls.append(type(m).__name__) if isinstance(m, Teacher) else None)
    try:
        assert main(["perceive", "--ckpt", str(trained), "--images", UNSEEN, "--out", str(out), "--levels",
                     "block3", "rgb", "--max-steps", "30"]) == 0
    finally:
        hook.remove()
    assert len(calls) == 1, calls
    (line,) = [json.loads(x) for x in (out / "perceive.jsonl").read_text().splitlines()]
    assert set(line["r2_after"]) == set(line["ari_after"]) == {"block3", "rgb"}
    assert line["r2_mean_after"] > line["r2_mean_before"] + 0.1
    # block1, not fitted, is not what was fitted: its R^2 moves less than the fitted levels'
    before, after = (load_student(p, device=CPU).evaluate(unseen()[None]) for p in (trained, line["ckpt"]))
    gain = {n: after[n]["r2"].item() - before[n]["r2"].item() for n in ("block1", "block3", "rgb")}
    assert gain["block3"] > gain["block1"] and gain["rgb"] > gain["block1"], gain
    capsys.readouterr()
    assert main(["perceive", "--ckpt", str(trained), "--images", UNSEEN, "--out", str(out),
                 "--levels", "block9"]) == 2
    err = capsys.readouterr().err
    assert "--levels" in err and "block9" in err


def steps_to(module, images: torch.Tensor, init: str, r2: float) -> list[int]:
    recipe = FitRecipe(init=init, target_r2=r2, max_steps=60, eval_every=2)
    return [f.steps for f in fit_images(module, images, list(range(len(images))), recipe, progress=False)]


def test_warm_start_from_the_distilled_student_reaches_the_target_sooner(trained):
    """What distillation buys at test time, on the photographs distilled on: the trained student
    starts near the target, a fresh one (same recipe, each image's own statistics) needs many
    steps. A warm start that loses the weights or the statistics fails this."""
    module = load_student(str(trained), device=CPU)
    hp = {k: v for k, v in module.hparams.items() if not k.startswith("_")}
    images = torch.stack([img for _, img in load_images([TRAIN], 224)])
    warm = steps_to(module, images, "trained", 0.45)
    cold = steps_to(APMModule(**hp).eval(), images, "fresh", 0.45)
    assert max(warm) <= 24 and min(cold) >= 24 and 2 * sum(warm) <= sum(cold), (warm, cold)


def test_batched_fitting_equals_one_image_at_a_time(trained):
    module = load_student(str(trained), device=CPU)
    images = torch.stack([img for _, img in load_images(["skimage:chelsea,coffee,moon"], 224)])
    recipe = FitRecipe(init="fresh", max_steps=12, eval_every=4)
    batch = fit_images(module, images, [5, 6, 7], recipe, progress=False)
    alone = fit_images(module, images[1:2], [6], recipe, progress=False)[0]
    assert [s for s, _ in alone.curve] == [s for s, _ in batch[1].curve] == [0, 4, 8, 12]
    assert [r for _, r in alone.curve] == pytest.approx([r for _, r in batch[1].curve], abs=2e-3)
    got = fitted_module(module, batch[1]).predict_features(images[1:2])
    want = fitted_module(module, alone).predict_features(images[1:2])
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=5e-3 * w.abs().max().item())
    # and each image got its own student
    assert not torch.allclose(batch[0].params["first.weight"], batch[1].params["first.weight"])


def test_official_protocol_starts_fresh_with_raw_targets(trained):
    module = load_student(str(trained), device=CPU)
    hp = {k: v for k, v in module.hparams.items() if not k.startswith("_")}
    untrained = APMModule(**hp).eval()
    official = FitRecipe(protocol="official", max_steps=0)
    (off,) = fit_images(module, unseen()[None], [0], official, progress=False)
    (off_untrained,) = fit_images(untrained, unseen()[None], [0], official, progress=False)
    (warm,) = fit_images(module, unseen()[None], [0], FitRecipe(max_steps=0), progress=False)
    assert off.r2_before == pytest.approx(off_untrained.r2_before, abs=1e-6)  # not the trained weights
    assert off.r2_before != pytest.approx(warm.r2_before, abs=0.05)
    fitted = fitted_module(module, off)
    for i in range(len(module.levels)):  # raw MSE: the identity standardization, saved with it
        assert torch.all(fitted.standardizer.mean(i) == 0) and torch.all(fitted.standardizer.std(i) == 1)


def test_checkpoint_of_another_teacher_or_size_is_refused(trained, tmp_path, capsys):
    other = tmp_path / "other.yaml"
    other.write_text("data:\n  image_size: 112\n")
    assert main(["perceive", "--ckpt", str(trained), "--config", str(CONFIGS / "apm.yaml"), "--config",
                 str(CONFIGS / "smoke.yaml"), "--config", str(other), "--images", UNSEEN,
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "'--ckpt'" in err and "data.image_size is 224 in the checkpoint but 112 here" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["perceive", "--ckpt", str(trained), "--config", str(CONFIGS / "apm.yaml"), "--config",
                 str(CONFIGS / "mvitv2.yaml"), "--config", str(CONFIGS / "mvitv2_smoke.yaml"),
                 "--images", UNSEEN, "--out", str(tmp_path / "o")]) == 2
    assert "another teacher" in capsys.readouterr().err


def test_api_features_match_eval_and_any_grid(trained):
    apm = APM.from_pretrained(trained, device="cpu")
    img = unseen()
    module = apm.module
    want = module.predict_features(img[None])  # what apm eval and the figures use
    for i, name in enumerate(apm.levels):
        assert torch.allclose(apm.features(img, name), want[i][0], atol=1e-5)
    lvl = "block2"
    h, w = apm.grid(lvl)
    coarse = apm.features(img, lvl)
    fine = apm.features(img, lvl, size=(2 * h, 2 * w))
    assert fine.shape == (2 * h, 2 * w, coarse.shape[-1])
    assert torch.allclose(fine.reshape(-1, coarse.shape[-1]), apm.at(img, lvl, grid_coords((2 * h, 2 * w))), atol=1e-5)
    # cell centres of a 3x finer grid include the coarse centres: (3i + 1 + 0.5) / 3h = (i + 0.5) / h
    third = apm.features(img, lvl, size=(3 * h, 3 * w))
    assert torch.allclose(third[1::3, 1::3], coarse, atol=1e-5)
    assert torch.allclose(apm.features(img, lvl, size=(2 * h, 2 * w), chunk=37), fine, atol=1e-5)
    batch = torch.stack([img, load_images(["skimage:coffee"], 224)[0][1]])
    assert apm.features(batch, lvl).shape == (2, h, w, coarse.shape[-1])
    # the teacher's features, against the same tiny DINOv2 built on its own and the patch colours
    teacher = create_teacher("dinov2_tiny", image_size=224)
    torch.testing.assert_close(apm.teacher_features(img, lvl), teacher(img[None])[1][0])
    colours = rearrange(torch.nn.functional.avg_pool2d(img[None], 14), "1 c h w -> h w c")
    torch.testing.assert_close(apm.teacher_features(img, "rgb"), colours)


def test_api_reads_paths_as_the_commands_do(trained, tmp_path):
    apm = APM.from_pretrained(trained, device="cpu")
    photo = tmp_path / "photo.png"
    skimage_photo("chelsea").save(photo)
    want = load_images([str(photo)], 224)[0][1]
    assert torch.equal(apm.prepare(photo)[0], want) and torch.equal(apm.prepare(str(photo))[0], want)
    skimage_photo("coffee").save(tmp_path / "second.png")
    with pytest.raises(ConfigError, match="holds 2 images"):
        apm.features(tmp_path, "block2")
    with pytest.raises(ConfigError, match="missing.png"):
        apm.features(tmp_path / "missing.png", "block2")


def test_readme_api_snippet_runs(trained, tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "APM.from_pretrained" in b)
    run = tmp_path / "runs" / "smoke" / "checkpoints"
    run.mkdir(parents=True)
    shutil.copy(trained, run / "last.ckpt")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    assert scope["f"].shape == scope["t"].shape and scope["fine"].shape[:2] == (32, 32)
    assert scope["v"].shape == (2, scope["f"].shape[-1])
    assert scope["fitted"].record["r2_mean_after"] > scope["fitted"].record["r2_mean_before"]
    assert APM.from_pretrained("chelsea.ckpt", device="cpu").levels == scope["apm"].levels


def test_perceive_reruns_resume_by_name_and_refuse_other_settings(trained, tmp_path, capsys):
    from apm.runlog import image_seed

    args = ["perceive", "--ckpt", str(trained), "--max-steps", "10", "--figures", "none"]
    out = tmp_path / "out"
    assert main([*args, "--out", str(out), "--images", "skimage:chelsea,coffee"]) == 0
    log = out / "perceive.jsonl"
    first = {x["image"]: x for x in map(json.loads, log.read_text().splitlines())}
    # seeded by its name, not its place in the list: alone, coffee fits exactly as second of two
    assert main([*args, "--out", str(tmp_path / "alone"), "--images", "skimage:coffee"]) == 0
    alone = json.loads((tmp_path / "alone" / "perceive.jsonl").read_text())
    assert alone["seed"] == first["coffee"]["seed"] == image_seed("coffee", 0) != first["chelsea"]["seed"]
    assert alone["r2_after"] == pytest.approx(first["coffee"]["r2_after"], abs=1e-5)
    # the API seeds a path the same way
    fitted = APM.from_pretrained(trained, device="cpu").perceive("skimage:coffee", max_steps=10, progress=False)
    assert fitted.record["seed"] == alone["seed"]

    # killed while writing the second line: the rerun drops the cut line and redoes that image
    lines = log.read_text().splitlines()
    log.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])
    with pytest.warns(UserWarning, match="incomplete last line"):
        assert main([*args, "--out", str(out), "--images", "skimage:chelsea,coffee"]) == 0
    again = {x["image"]: x for x in map(json.loads, log.read_text().splitlines())}
    assert set(again) == {"chelsea", "coffee"}
    assert again["coffee"]["r2_after"] == pytest.approx(first["coffee"]["r2_after"], abs=1e-5)

    # other settings into the same folder: refused, nothing skipped silently
    capsys.readouterr()
    assert main([*args, "--out", str(out), "--images", "skimage:chelsea", "--protocol", "official"]) == 2
    err = capsys.readouterr().err
    assert "perceive.jsonl holds results of other settings" in err and "protocol" in err
    assert len(log.read_text().splitlines()) == 2


def test_official_protocol_refuses_the_settings_it_would_ignore(trained, tmp_path, capsys):
    for extra in (["--init", "trained"], ["--queries", "64"]):
        assert main(["perceive", "--ckpt", str(trained), "--images", UNSEEN, "--out", str(tmp_path),
                     "--protocol", "official", *extra]) == 2
        err = capsys.readouterr().err
        assert "--protocol official" in err and extra[0] in err and len(err.strip().splitlines()) == 1


def test_api_takes_uint8_tensors_fits_under_no_grad_and_times_the_fit_alone(trained):
    import time

    apm = APM.from_pretrained(trained, device="cpu")
    img = unseen()
    as_bytes = (img * 255).round().to(torch.uint8)
    assert (apm.prepare(as_bytes) - apm.prepare(img)).abs().max() <= 0.5 / 255 + 1e-6
    assert torch.equal(apm.prepare(as_bytes[None]), apm.prepare(as_bytes))

    with torch.inference_mode():  # a caller's inference or no_grad block does not stop the fit
        fitted = apm.perceive(img, max_steps=20, progress=False)
    assert fitted.record["steps"] > 0 and fitted.record["r2_mean_after"] > fitted.record["r2_mean_before"]

    # seconds are the fitting alone, as in apm perceive: a slow teacher does not count
    hook = apm.module.teacher.register_forward_hook(lambda *_: time.sleep(1.0))
    try:
        record = apm.perceive(img, max_steps=0, progress=False).record
    finally:
        hook.remove()
    assert record["seconds"] < 0.5, record["seconds"]


def test_api_from_config_starts_fresh_by_default(trained):
    untrained = APM.from_config(CONFIGS / "apm.yaml", CONFIGS / "smoke.yaml", device="cpu")
    assert not untrained.trained and APM.from_pretrained(trained, device="cpu").trained
    record = untrained.perceive(unseen(), max_steps=0, progress=False).record
    assert record["init"] == "fresh"
    with pytest.raises(ConfigError, match="--protocol official"):
        untrained.perceive(unseen(), protocol="official", init="trained", max_steps=0, progress=False)


def test_save_pretrained_writes_a_folder_that_loads_without_pickle(trained, tmp_path, capsys):
    from safetensors.torch import load_file

    apm = APM.from_pretrained(trained, device="cpu")
    folder = apm.save_pretrained(tmp_path / "student")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["hyper_parameters"]["teacher"] == "dinov2_tiny" and config["apm"]["teacher"]["levels"]
    assert set(load_file(folder / "model.safetensors")) == set(apm.module.state_dict())  # tensors only
    again = APM.from_pretrained(folder, device="cpu")
    img = unseen()
    for lvl in apm.levels:
        torch.testing.assert_close(again.features(img, lvl), apm.features(img, lvl))
    assert main(["eval", "--ckpt", str(folder), "--images", UNSEEN, "--json", str(tmp_path / "e.json"),
                 "--device", "cpu"]) == 0  # the tools load it too
    (folder / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="save_pretrained"):
        APM.from_pretrained(folder, device="cpu")
