"""Several teachers in one student (``model.teachers``): the set's levels and inputs, a two-teacher
run through the real command line (train, resume, eval, islands), learning both teachers' levels on
one photograph, per-teacher feature caches, old single-teacher checkpoints loading bit for bit, and
the config mistakes that stop a run before its first step."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from apm.cli import load_student
from apm.data import load_images
from apm.cli import main
from apm.data import APMDataModule, image_transform, skimage_photo
from apm.errors import ConfigError
from apm.module import APMModule
from teachers import create_teacher
from teachers.multi import TeacherSet, build_teachers, parse_specs
from tests.conftest import CONFIGS, ROOT, saved_checkpoint

DINO = {"name": "dinov2_tiny", "args": {"pretrained": False}, "image_size": 56}
MVIT = {"name": "mvitv2_tiny", "args": {"pretrained": False, "levels": [1, 3]}, "image_size": 64}
NAMES = ["dinov2_tiny/block1", "dinov2_tiny/block2", "dinov2_tiny/block3", "mvitv2_tiny/block1",
         "mvitv2_tiny/block3"]
# the levels of a run of agglomerative_smoke.yaml: each teacher's, in order, then rgb
SMOKE_LEVELS = ["dinov2_tiny/block1", "dinov2_tiny/block2", "dinov2_tiny/block3", "mvitv2_tiny/block1",
                "mvitv2_tiny/block2", "rgb"]
SMOKE = ["-c", str(CONFIGS / "apm.yaml"), "-c", str(CONFIGS / "agglomerative.yaml"),
         "-c", str(CONFIGS / "agglomerative_smoke.yaml")]


def photo(size: int, name: str = "astronaut") -> torch.Tensor:
    return image_transform(size)(skimage_photo(name))[None]


# -- the set itself ----------------------------------------------------------------------------------
def test_set_levels_are_each_teachers_levels_on_its_own_resized_input():
    s = build_teachers([DINO, MVIT], image_size=112)
    assert [l.name for l in s.levels] == NAMES
    # each level keeps its teacher's grid at that teacher's own size: 56/14 = 4; 64/4 = 16, 64/16 = 4
    assert [l.grid for l in s.levels] == [(4, 4)] * 3 + [(16, 16), (4, 4)]
    assert [l.dim for l in s.levels] == [32] * 3 + [16, 64]
    assert s.patch_size == 112 // 4  # the student's column keeps the first teacher's 4x4 grid

    image = photo(112)
    feats = s(image)
    # independently: each teacher alone, on the image resized (bilinear, antialiased) to its size
    for spec, want_names in ((DINO, NAMES[:3]), (MVIT, NAMES[3:])):
        alone = create_teacher(spec["name"], image_size=spec["image_size"], **spec["args"])
        small = F.interpolate(image, size=(spec["image_size"],) * 2, mode="bilinear", antialias=True)
        for got, want in zip([feats[NAMES.index(n)] for n in want_names], alone(small)):
            torch.testing.assert_close(got, want)
    # a member at the set's own size sees the very image
    same = build_teachers([{**DINO, "image_size": 112}], image_size=112)
    torch.testing.assert_close(same(image)[0], create_teacher("dinov2_tiny", image_size=112)(image)[0])

    s.set_precision("bf16")
    assert [m.precision for m in s.members] == ["bf16", "bf16"]


def test_entries_take_defaults_and_reject_what_cannot_be_a_level_prefix():
    specs = parse_specs([{"name": "my.module:dinov2_tiny"}, {"name": "dinov2_tiny", "alias": "b"}], 224)
    assert [(s.alias, s.image_size, s.args) for s in specs] == [("dinov2_tiny", 224, {}), ("b", 224, {})]
    for bad, setting in [([{"name": "dinov2_tiny", "alias": "a/b"}], "model.teachers[0].alias"),
                         ([{"name": "dinov2_tiny", "size": 3}], "model.teachers[0]"),
                         ([{"name": "dinov2_tiny", "args": {"image_size": 56}}],
                          "model.teachers[0].image_size"),
                         ([], "model.teachers")]:
        with pytest.raises(ConfigError, match=re.escape(f"'{setting}")):
            parse_specs(bad, 224)


# -- a two-teacher run through the command line -----------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """``apm fit`` on the agglomerative smoke configs, shrunk: 4 steps (2 training photographs a
    batch, 2 validation ones; validation every step, island figures at the third), then resumed
    to 6 with ``--ckpt_path last``."""
    root = tmp_path_factory.mktemp("agglo")
    args = [*SMOKE, "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.precision", "32-true",
            "--trainer.check_val_every_n_epoch", "1", "--trainer.logger",
            "{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {save_dir: ., name: csv}}",
            "--data.images", "skimage:astronaut,coffee,chelsea,rocket", "--data.val_fraction", "0.5",
            "--data.batch_size", "2", "--model.hidden_dims", "[64, 64]", "--model.stats_images", "2"]
    old = os.getcwd()
    os.chdir(root)
    try:
        assert main(["fit", *args, "--trainer.max_steps", "4"]) == 0
        first = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
        assert main(["fit", *args, "--trainer.max_steps", "6", "--ckpt_path", "last"]) == 0
    finally:
        os.chdir(old)
    return root, first


def open_rgb(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.mark.slow
def test_two_teacher_run_resumes_and_its_checkpoint_records_the_set(run):
    root, first = run
    last = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert first["global_step"] == 4 and last["global_step"] == 6  # continued, not restarted
    assert all(float(s["step"]) == 6 for s in last["optimizer_states"][0]["state"].values())
    hp = last["hyper_parameters"]
    assert hp["teacher"] is None and [t["name"] for t in hp["teachers"]] == ["dinov2_tiny", "mvitv2_tiny"]
    members = last["apm"]["teacher"]["members"]
    assert [m["alias"] for m in members] == ["dinov2_tiny", "mvitv2_tiny"]
    assert [m["image_size"] for m in members] == [112, 96]
    levels = [n for n, _, _ in last["apm"]["levels"]]
    assert levels == SMOKE_LEVELS
    # statistics restored on resume, one per level of each teacher
    for k in (k for k in first["state_dict"] if k.startswith("standardizer.mean_")):
        assert torch.equal(first["state_dict"][k], last["state_dict"][k]), k
    # the IslandFigures callback drew a row per level (names with '/' in them) into the log folder
    figs = sorted(root.glob("csv/version_*/islands/*.png"))
    assert figs and open_rgb(figs[-1]).shape[0] > 6 * 160


@pytest.mark.slow
def test_two_teacher_checkpoint_in_eval_islands_and_interpolate(run, tmp_path):
    root, _ = run
    ckpt = str(root / "checkpoints" / "last.ckpt")
    out = tmp_path / "eval.json"
    assert main(["eval", "--ckpt", ckpt, "--images", "skimage:astronaut,coffee", "--json", str(out),
                 "--k", "4", "--device", "cpu"]) == 0
    res = json.loads(out.read_text())
    assert list(res["levels"]) == SMOKE_LEVELS  # one row per level of each teacher, then rgb
    assert all(np.isfinite(v) for m in res["levels"].values() for v in m.values())
    # R^2 of an MViTv2 level (its own grid) against a numpy computation from the features
    module = load_student(ckpt, device=torch.device("cpu"))
    images = torch.stack([img for _, img in load_images(["skimage:astronaut,coffee"], 112)])
    i = SMOKE_LEVELS.index("mvitv2_tiny/block2")
    t = module.targets(images)[i].reshape(2, -1, module.levels[i].dim).double().numpy()
    p = module.predict_features(images, [i])[0].reshape(t.shape).double().numpy()
    r2 = [1 - ((p[b] - t[b]) ** 2).sum() / ((t[b] - t[b].mean(0)) ** 2).sum() for b in range(2)]
    assert res["levels"]["mvitv2_tiny/block2"]["r2"] == pytest.approx(np.mean(r2), abs=1e-4)

    figs = tmp_path / "islands"
    assert main(["islands", "--ckpt", ckpt, "--images", "skimage:astronaut", "--out", str(figs),
                 "--method", "pca", "--display", "48", "--device", "cpu"]) == 0
    full = open_rgb(figs / "astronaut.png")
    assert full.shape[0] >= 6 * 48  # six rows
    sub = tmp_path / "sub"
    assert main(["islands", "--ckpt", ckpt, "--images", "skimage:astronaut", "--out", str(sub),
                 "--method", "pca", "--display", "48", "--levels", "mvitv2_tiny/block1", "rgb"]) == 0
    assert [p.name for p in sub.iterdir()] == ["astronaut.png"]
    assert open_rgb(sub / "astronaut.png").shape[0] < full.shape[0]

    strip = tmp_path / "interp" / "strip.png"
    assert main(["interpolate", "--ckpt", ckpt, "--a", "skimage:astronaut", "--b", "skimage:coffee",
                 "--steps", "3", "--out", str(strip), "--display", "32", "--no-gif",
                 "--levels", "dinov2_tiny/block3", "mvitv2_tiny/block2"]) == 0
    assert strip.is_file()


@pytest.mark.slow
def test_two_teacher_checkpoint_in_perceive_and_the_api(run, tmp_path):
    from apm.api import APM

    root, _ = run
    ckpt = str(root / "checkpoints" / "last.ckpt")
    out = tmp_path / "perceive"
    assert main(["perceive", "--ckpt", ckpt, "--images", "skimage:camera", "--out", str(out),
                 "--max-steps", "20", "--eval-every", "10", "--device", "cpu"]) == 0
    (line,) = [json.loads(x) for x in (out / "perceive.jsonl").read_text().splitlines()]
    assert list(line["r2_after"]) == SMOKE_LEVELS and set(line["ari_after"]) == set(SMOKE_LEVELS)
    assert line["r2_mean_after"] > line["r2_mean_before"] + 0.1, line  # the fit fits every level
    assert all(line["r2_after"][n] > line["r2_before"][n] for n in SMOKE_LEVELS), line
    assert sorted(p.name for p in out.glob("*.png")) == ["camera_after.png", "camera_before.png"]
    fitted = APM.from_pretrained(line["ckpt"], device="cpu")
    assert fitted.levels == SMOKE_LEVELS
    assert tuple(fitted.features("skimage:camera", "mvitv2_tiny/block1").shape[-3:-1]) == (24, 24)


def test_islands_of_the_teachers_alone_from_the_configs(tmp_path):
    out = tmp_path / "teacher"
    assert main(["islands", *[a.replace("-c", "--config") for a in SMOKE], "--images",
                 "skimage:coffee", "--out", str(out), "--display", "48", "--method", "pca"]) == 0
    a = open_rgb(out / "coffee.png")
    assert a.shape[0] >= 5 * 48 and a.shape[1] < 3 * 48 + 100  # 5 teacher levels, no student column


# -- learning ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_one_student_fits_both_teachers_levels_on_one_photograph(astronaut_224):
    """The tiny DINOv2 at 224 (16x16 grid) and the tiny MViTv2 at 112 (blocks 1 and 3: 28x28 and
    7x7) in one student; every location of every level each step. Measured after 250 steps: R^2
    0.95 on the DINOv2 levels, 0.88 and 0.995 on the MViTv2 ones, 0.998 rgb; untrained, about 0."""
    teachers = [{"name": "dinov2_tiny", "args": {"pretrained": False}},
                {"name": "mvitv2_tiny", "args": {"pretrained": False, "levels": [1, 3]}, "image_size": 112}]
    torch.manual_seed(0)
    m = APMModule(teachers=teachers, image_size=224, hidden_dims=[256, 256, 256], pe_dim=128,
                  level_dim=16, queries_per_image=0, stats_images=1)
    untrained = APMModule(**m.hparams)
    image = astronaut_224
    m.fit_statistics([image])
    untrained.standardizer.load_state_dict(m.standardizer.state_dict())
    feats = m.targets(image)
    opt = torch.optim.AdamW(m.student.parameters(), lr=1e-3)
    for step in range(250):
        for g in opt.param_groups:
            g["lr"] = 1e-3 * min(1.0, (step + 1) / 20)
        loss, _ = m.distillation_loss(image, feats)
        opt.zero_grad()
        loss.backward()
        opt.step()
    res, before = m.eval().evaluate(image), untrained.eval().evaluate(image)
    assert [n for n in res if "/" in n] == [l.name for l in m.teacher.levels]
    for name, r in res.items():
        assert r["r2"].item() > 0.8, (name, r)
        assert before[name]["r2"].item() < 0.5, name  # the bar means something: untrained fails it


# -- per-teacher feature caches ----------------------------------------------------------------------
PHOTOS = ["astronaut", "coffee", "chelsea"]


class CountCalls(L.Callback):
    """Forward calls of each member of the set during training epochs (real forward hooks)."""

    def setup(self, trainer, pl_module, stage):
        self.calls = {a: 0 for a in pl_module.teacher.aliases}
        self.training = False
        for alias, member in zip(pl_module.teacher.aliases, pl_module.teacher.members):
            member.register_forward_hook(lambda *_, a=alias: self.count(a))

    def count(self, alias):
        if self.training:
            self.calls[alias] += 1

    def on_train_epoch_start(self, trainer, pl_module):
        self.training = True  # level statistics are computed before, without the cache


def fit_cached(tmp_path, cache, teachers, epochs=1):
    torch.manual_seed(0)
    model = APMModule(teachers=teachers, image_size=56, hidden_dims=[32], pe_dim=8, level_dim=4,
                      queries_per_image=64, stats_images=2, feature_cache=str(cache))
    data = APMDataModule(images="skimage:" + ",".join(PHOTOS), image_size=56, batch_size=2,
                         val_fraction=0, num_workers=0)
    counter = CountCalls()
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[counter], default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data)
    return model, counter.calls


def files(folder: Path) -> dict[str, tuple[int, str]]:
    return {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.iterdir())}


def test_adding_a_teacher_fills_only_its_own_cache(tmp_path):
    cache = tmp_path / "cache"
    model, calls = fit_cached(tmp_path, cache, [DINO])
    assert calls == {"dinov2_tiny": 2} and model.feature_cache.complete  # 3 photos, batches of 2
    before = files(cache / "dinov2_tiny")
    assert any(n.startswith("block1-") for n in before)

    model, calls = fit_cached(tmp_path, cache, [DINO, MVIT], epochs=2)
    assert calls == {"dinov2_tiny": 0, "mvitv2_tiny": 2}  # the new teacher only, and only once
    assert files(cache / "dinov2_tiny") == before  # not rewritten: same bytes, same mtimes
    mvit = json.loads((cache / "mvitv2_tiny" / "manifest.json").read_text())
    assert mvit["teacher"]["name"] == "mvitv2_tiny" and mvit["teacher"]["describe"]["image_size"] == 64
    assert [n for n, _, _ in mvit["levels"]] == ["block1", "block3"]
    # the cached targets are the teachers' own, in the set's level order (up to float16)
    images = torch.cat([photo(56, n) for n in model.trainer.datamodule.train_set.sources])
    for got, want in zip(model.targets(images, torch.arange(3)), model.targets(images)):
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)

    _, calls = fit_cached(tmp_path, cache, [MVIT, DINO])  # another order: nothing to compute
    assert calls == {"mvitv2_tiny": 0, "dinov2_tiny": 0}
    with pytest.raises(ConfigError, match="another teacher"):  # a changed member is still refused
        fit_cached(tmp_path, cache, [DINO, {**MVIT, "args": {**MVIT["args"], "seed": 1}}])


def test_a_member_cache_is_refused_when_the_images_it_resizes_change_size(tmp_path):
    """A member resizes the set's input to its own side: its features depend on both sizes."""
    kw = dict(teachers=[MVIT], hidden_dims=[32], pe_dim=8, level_dim=4, feature_cache=str(tmp_path))
    APMModule(image_size=56, **kw).open_feature_cache(PHOTOS)
    APMModule(image_size=56, **kw).open_feature_cache(PHOTOS)  # the same: reused
    with pytest.raises(ConfigError, match="input_size"):
        APMModule(image_size=112, **kw).open_feature_cache(PHOTOS)


def test_a_one_teacher_cache_and_a_set_cache_are_not_mixed(tmp_path):
    from apm.cache import FeatureCache, FeatureCacheSet, teacher_identity

    t = create_teacher("dinov2_tiny", image_size=56)
    FeatureCache.open(tmp_path / "one", teacher_identity("dinov2_tiny", {}, t), t.levels, PHOTOS,
                      verbose=False)
    member = [("dinov2_tiny", teacher_identity("dinov2_tiny", {}, t), t.levels)]
    with pytest.raises(ConfigError, match="one-teacher run.*dinov2_tiny"):
        FeatureCacheSet.open(tmp_path / "one", member, PHOTOS, verbose=False)
    FeatureCacheSet.open(tmp_path / "set", member, PHOTOS, verbose=False)
    with pytest.raises(ConfigError, match="per-teacher caches"):
        FeatureCache.open(tmp_path / "set", teacher_identity("dinov2_tiny", {}, t), t.levels, PHOTOS)


# -- checkpoints -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["dinov2_tiny", "mvitv2_tiny"])
def test_single_teacher_checkpoints_of_the_earlier_code_give_the_same_features(name):
    """tests/data holds checkpoints written before model.teachers existed, with the features the
    writing code computed (tests/data/make_single_teacher_checkpoints.py)."""
    data = ROOT / "tests" / "data"
    saved = torch.load(data / f"single_{name}_features.pt", weights_only=True)
    assert "teachers" not in torch.load(data / f"single_{name}.ckpt", weights_only=True)["hyper_parameters"]
    m = APMModule.from_checkpoint(data / f"single_{name}.ckpt")
    assert not isinstance(m.teacher, TeacherSet) and m.hparams.teacher == name
    assert [l.name for l in m.levels] == saved["levels"]  # unprefixed, as before
    image = saved["image"]
    # Written on another CPU: kernels differ in the last bits (measured up to 1e-6 of a level's
    # largest value across an AVX2 and an AVX-512 machine). A teacher rebuilt with another seed,
    # or a legacy setting read wrong (pe_max_freq, level_entry), is off by 1e-1 and more.
    for got, want in zip([*m.targets(image), *m.predict_features(image)], [*saved["teacher"], *saved["student"]]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_a_set_checkpoint_refuses_another_set(tmp_path):
    m = APMModule(teachers=[DINO, MVIT], image_size=112, hidden_dims=[32], pe_dim=16, level_dim=4)
    path = tmp_path / "set.ckpt"
    saved_checkpoint(m, path)
    again = APMModule.from_checkpoint(path)
    assert [l.name for l in again.levels] == NAMES + ["rgb"]
    reseeded = [DINO, {**MVIT, "args": {**MVIT["args"], "seed": 1}}]
    with pytest.raises(ConfigError, match=r"'--ckpt'.*model.teachers is \["):
        APMModule.from_checkpoint(path, "cpu", "--ckpt", teachers=reseeded)
    with pytest.raises(ConfigError, match=r"model.teachers is"):
        APMModule.from_checkpoint(path, teachers=[MVIT, DINO])
    # and a one-teacher checkpoint does not load into a set of that one teacher
    one = tmp_path / "one.ckpt"
    saved_checkpoint(APMModule(teacher="dinov2_tiny", teacher_args={"pretrained": False},
                               image_size=56, hidden_dims=[32], pe_dim=16, level_dim=4), one)
    with pytest.raises(ConfigError, match="model.teacher"):
        APMModule.from_checkpoint(one, teacher=None, teacher_args=None, teachers=[DINO])


# -- config mistakes stop before step 1 ----------------------------------------------------------------
QUICK = [*SMOKE, "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
         "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
         "--trainer.num_sanity_val_steps", "0", "--data.images", "skimage:astronaut",
         "--data.val_fraction", "0", "--model.hidden_dims", "[16]", "--model.stats_images", "1"]


def fails(capsys, tmp_path, *args: str) -> str:
    capsys.readouterr()
    assert main(["fit", *QUICK, *args]) == 2
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert not list(tmp_path.rglob("*.ckpt"))  # stopped before any step
    return lines[0]


TINY_DINO = "{name: dinov2_tiny, args: {pretrained: false}}"


@pytest.mark.parametrize("teachers, setting, expect", [
    (f"[{TINY_DINO}, {{name: dinov3_huge}}]", "model.teachers[1].name", "mvitv2_tiny"),
    (f"[{TINY_DINO}, {{name: dinov2_tiny, args: {{pretrained: false, seed: 1}}}}]",
     "model.teachers[1].alias", "alias"),
    ("[{name: dinov2_tiny, args: {pretrained: false}, image_size: 100}]",
     "model.teachers[0].image_size", "98 and 112"),
    ("[{name: mvitv2_tiny, args: {pretrained: false}, image_size: 100}]",
     "model.teachers[0].image_size", "96 and 112"),
    ("[{name: dinov2_tiny, args: {pretrained: false, levels: [9]}}]",
     "model.teachers[0].args.levels", "0..3"),
    ("[{name: dinov2_tiny, args: {pretrained: true}}]",
     "model.teachers[0]'", "no released weights"),
])
def test_a_wrong_entry_names_it(capsys, tmp_path, monkeypatch, teachers, setting, expect):
    monkeypatch.chdir(tmp_path)
    msg = fails(capsys, tmp_path, "--model.teachers", teachers)
    assert f"'{setting}" in msg and expect in msg, msg


def test_image_size_off_the_students_patch_names_the_settings(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # the first teacher's grid is 8x8 (dinov2_tiny at 112): a 100-pixel input cannot keep it
    msg = fails(capsys, tmp_path, "--data.image_size", "100")
    assert "'model.patch_size'" in msg and "'data.image_size'" in msg and "96 or 104" in msg, msg
    msg = fails(capsys, tmp_path, "--data.image_size", "100", "--model.patch_size", "14")
    assert "'data.image_size'" in msg and "model.patch_size" in msg and "98" in msg, msg


def test_one_teacher_and_a_list_at_once_is_ambiguous(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    msg = fails(capsys, tmp_path, "--model.teacher", "dinov2_tiny")
    assert "'model.teachers'" in msg and "'model.teacher'" in msg and "null" in msg, msg
