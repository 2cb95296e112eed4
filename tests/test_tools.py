"""``apm islands``, ``apm eval``, ``apm interpolate`` and the IslandFigures callback, on a checkpoint
trained once by the real CLI on the smoke configuration (shrunk to 112 px), offline; and the numbers
of ``apm.analysis`` (scores, controls, interpolation) against independent computations."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from apm.analysis import interpolate_features, island_scores
from apm.cli import main
from apm.data import image_transform, skimage_photo
from apm.module import APMModule
from tests.conftest import CONFIGS, ROOT

LEVELS = {"block1", "block2", "block3", "rgb"}
METRICS = {"cos", "cos_centered", "r2", "mse", "ari", "nmi", "ari_control", "nmi_control"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """``apm fit -c apm.yaml -c smoke.yaml -c <overlay>``: 8 steps at 112 px (4 training and 2
    validation photographs) with CSV and wandb (offline) loggers and the IslandFigures callback on
    every validation epoch."""
    root = tmp_path_factory.mktemp("smoke")
    overlay = {
        "trainer": {
            "max_steps": 8, "check_val_every_n_epoch": 4, "default_root_dir": str(root),
            "callbacks": [  # the configs' CSV and wandb loggers follow default_root_dir
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"save_top_k": 0, "save_last": True}},
                {"class_path": "apm.callbacks.IslandFigures",
                 "init_args": {"every_n_val_epochs": 1, "num_images": 2, "method": "pca", "display": 64}},
            ],
        },
        "data": {"image_size": 112, "max_images": 6, "val_fraction": 0.34, "batch_size": 4},
        "model": {"stats_images": 4},
    }
    (root / "overlay.yaml").write_text(yaml.safe_dump(overlay))
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "apm", "fit", "-c", str(CONFIGS / "apm.yaml"), "-c",
         str(CONFIGS / "smoke.yaml"), "-c", str(root / "overlay.yaml")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = root / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    return root, ckpt


def open_rgb(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def assert_not_blank(a: np.ndarray) -> None:
    assert a.std() > 20, a.std()
    assert len(np.unique(a.reshape(-1, 3), axis=0)) > 50


@pytest.mark.slow
def test_islands_command_writes_one_figure_per_image(run, tmp_path, capsys):
    _, ckpt = run
    photo = tmp_path / "cat photo.jpg"
    skimage_photo("chelsea").save(photo)
    out = tmp_path / "islands"
    assert main(["islands", "--ckpt", str(ckpt), "--images", "skimage:astronaut", str(photo),
                 "--out", str(out), "--display", "96", "--perplexity", "10", "--device", "cpu"]) == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["astronaut.png", "cat photo.png"]
    a = open_rgb(out / "astronaut.png")
    h, w, _ = a.shape
    assert w >= 3 * 96 and h >= 4 * 96  # 3 columns (input, teacher, student), a row per level
    assert_not_blank(a)
    assert_not_blank(a[:, 2 * w // 3 :])  # the student column has content of its own
    assert str(out / "astronaut.png") in capsys.readouterr().out

    # a chosen level subset: fewer rows, same width
    sub = tmp_path / "sub"
    assert main(["islands", "--ckpt", str(ckpt), "--images", "skimage:astronaut", "--out", str(sub),
                 "--display", "96", "--levels", "block3", "rgb", "--method", "pca"]) == 0
    b = open_rgb(sub / "astronaut.png")
    assert b.shape[1] == w and b.shape[0] < h


def test_islands_teacher_only_from_config(tmp_path):
    out = tmp_path / "teacher"
    assert main(["islands", "--config", str(CONFIGS / "apm.yaml"), "--config", str(CONFIGS / "smoke.yaml"),
                 "--images", "skimage:coffee", "--out", str(out), "--display", "64", "--method", "pca"]) == 0
    a = open_rgb(out / "coffee.png")
    assert_not_blank(a)
    assert 2 * 64 <= a.shape[1] < 3 * 64 + 100  # input and teacher columns only
    assert a.shape[0] >= 3 * 64  # three levels of the tiny teacher


@pytest.mark.slow
def test_eval_json_has_every_level_and_metric(run, tmp_path, capsys):
    _, ckpt = run
    out = tmp_path / "eval.json"
    assert main(["eval", "--ckpt", str(ckpt), "--images", "skimage:astronaut,coffee", "--json",
                 str(out), "--k", "6"]) == 0
    res = json.loads(out.read_text())
    assert set(res["levels"]) == LEVELS
    for name, m in res["levels"].items():
        assert set(m) == METRICS, name
        assert all(math.isfinite(v) for v in m.values()), (name, m)
        assert -1 <= m["ari"] <= 1 and 0 <= m["nmi"] <= 1
        assert -1 <= m["ari_control"] <= 1.0  # 1.0: the ARI of identical features
    assert set(res["mean"]) == METRICS
    assert res["mean"]["r2"] == pytest.approx(np.mean([m["r2"] for m in res["levels"].values()]))
    assert res["control"] == "the teacher of the next image"
    table = capsys.readouterr().out
    assert all(n in table for n in [*LEVELS, "mean", "ari", "nmi", "ari_control", "nmi_control"])

    # image i's control is image (i + 1) mod N however the images are batched
    one = tmp_path / "batch1.json"
    assert main(["eval", "--ckpt", str(ckpt), "--images", "skimage:astronaut,coffee", "--json",
                 str(one), "--k", "6", "--batch-size", "1"]) == 0
    batched = json.loads(one.read_text())["levels"]
    assert all(batched[n] == pytest.approx(m, abs=1e-4) for n, m in res["levels"].items())

    single = tmp_path / "single.json"
    assert main(["eval", "--ckpt", str(ckpt), "--images", "skimage:astronaut", "--json", str(single)]) == 0
    res = json.loads(single.read_text())
    assert res["control"] == "the teacher of the image flipped left-right"
    assert all(-1 <= m["ari_control"] <= 1.0 for m in res["levels"].values())
    assert "flipped left-right" in capsys.readouterr().out


@pytest.mark.slow
def test_interpolate_writes_strip_and_gif(run, tmp_path):
    _, ckpt = run
    out = tmp_path / "interp" / "strip.png"
    assert main(["interpolate", "--ckpt", str(ckpt), "--a", "skimage:astronaut", "--b", "skimage:coffee",
                 "--steps", "4", "--out", str(out), "--display", "48"]) == 0
    a = open_rgb(out)
    assert a.shape[1] >= (4 + 2) * 48 and a.shape[0] >= 4 * 48  # A, 4 steps, B; a row per level
    assert_not_blank(a)
    with Image.open(out.with_suffix(".gif")) as gif:
        assert gif.n_frames == 6  # 4 steps there and 2 back
        assert gif.size[1] == 48


@pytest.mark.slow
def test_callback_writes_figures_to_run_folder_and_wandb(run):
    root, _ = run
    figs = sorted((root / "csv").glob("version_*/islands/*.png"))
    # 8 steps = 8 epochs of 1 step, validated every 4 epochs: two rounds of the 2 validation images
    assert [p.name for p in figs] == ["step000004-0.png", "step000004-1.png",
                                      "step000008-0.png", "step000008-1.png"]
    assert_not_blank(open_rgb(figs[-1]))
    assert list((root / "wandb").glob("offline-run-*/files/media/images/islands_*.png"))


# -- the numbers, against independent computations ---------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    """A fresh module on the tiny random DINOv2 at 112 px (8x8 grid), statistics set on three
    photographs; and those photographs (3, 3, 112, 112)."""
    torch.manual_seed(0)
    module = APMModule(teacher="dinov2_tiny", teacher_args={"pretrained": False}, image_size=112,
                       hidden_dims=[32, 32], pe_dim=16, level_dim=8, stats_images=3)
    images = torch.stack([image_transform(112)(skimage_photo(n)) for n in ("astronaut", "coffee", "chelsea")])
    module.fit_statistics([images])
    return module.eval(), images


def numpy_r2(student: np.ndarray, teacher: np.ndarray) -> np.ndarray:
    """R^2 per image of (B, h, w, d) features: 1 - SSE / the teacher's sum of squares around its
    mean over the image's locations."""
    s, t = (x.reshape(x.shape[0], -1, x.shape[-1]).astype(np.float64) for x in (student, teacher))
    return 1 - ((s - t) ** 2).sum((1, 2)) / ((t - t.mean(1, keepdims=True)) ** 2).sum((1, 2))


def test_scores_of_identical_and_of_other_images_features(tiny, monkeypatch):
    module, images = tiny
    teacher = module.targets(images)

    def student_is(feats):  # the student's predictions for the first len(imgs) images replaced
        monkeypatch.setattr(module, "predict_features",
                            lambda imgs, levels: [feats[i][: len(imgs)] for i in levels])

    student_is(teacher)  # identical features
    for name, m in island_scores(module, images, k=6).items():
        assert m["r2"] == pytest.approx([1.0] * 3, abs=1e-6), name
        assert m["cos"] == pytest.approx([1.0] * 3, abs=1e-6), name
        assert m["ari"] == [1.0] * 3 and m["nmi"] == pytest.approx([1.0] * 3), name
        assert all(abs(a) < 0.2 for a in m["ari_control"]), (name, m["ari_control"])  # another photo

    # image i's student predicts image (i + 1)'s teacher features: near chance, except the
    # control, which pairs image i's student with image (i + 1)'s teacher: identical features
    student_is([t.roll(-1, 0) for t in teacher])
    for (name, m), t in zip(island_scores(module, images, k=6).items(), teacher):
        t = t.numpy()
        assert m["r2"] == pytest.approx(numpy_r2(np.roll(t, -1, 0), t), rel=1e-5, abs=1e-6), name
        assert all(abs(a) < 0.2 for a in m["ari"]), (name, m["ari"])
        assert m["ari_control"] == [1.0] * 3, name

    # a batch's last image takes the next batch's first as its control; one image alone, its mirror
    rolled = island_scores(module, images[:2], k=6, next_image=images[2])
    assert all(m["ari_control"] == [1.0, 1.0] for m in rolled.values())
    student_is([t.flip(2) for t in teacher])
    assert all(m["ari_control"] == [1.0] for m in island_scores(module, images[:1], k=6).values())


def test_interpolation_ends_are_the_images_and_midpoint_mixes_columns(tiny):
    module, images = tiny
    st, levels = module.student, list(range(len(module.levels)))
    feats = interpolate_features(module, images[0], images[1], 3, levels)  # a = 0, 0.5, 1
    ends = module.predict_features(images[:2], levels)
    with torch.no_grad():
        mid = (st.trigger(images[:1]) + st.trigger(images[1:2])) / 2  # (1, h*w)
        for lvl, f, e in zip(levels, feats, ends):
            torch.testing.assert_close(f[0], e[0])
            torch.testing.assert_close(f[2], e[1])
            # the plain query [T, PE, E] through the unfactorized layers, not column_term etc.
            q = st.query_vectors(mid, lvl, st.coords(lvl))
            want = module.standardizer.decode(lvl, st.decode(lvl, st.first(q)))[0]
            torch.testing.assert_close(f[1], want.reshape(f[1].shape), rtol=1e-4, atol=1e-5)
            assert not torch.allclose(f[1], f[0]) and not torch.allclose(f[1], f[2])


def test_help_and_user_errors(tmp_path, capsys):
    for tool in ("islands", "eval", "interpolate"):
        with pytest.raises(SystemExit) as e:
            main([tool, "--help"])
        assert e.value.code == 0
    assert "--perplexity" in capsys.readouterr().out
    assert main(["islands", "--ckpt", str(tmp_path / "nope.ckpt"), "--images", "skimage:astronaut",
                 "--out", str(tmp_path)]) == 2
    assert main(["islands", "--config", str(CONFIGS / "smoke.yaml"), "--images", "skimage:nope",
                 "--out", str(tmp_path)]) == 2
    assert main(["islands", "--images", "skimage:astronaut", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--ckpt" in err and "skimage" in err and "--config" in err
