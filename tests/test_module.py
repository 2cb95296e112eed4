"""APMModule's loss, weights and schedule against independent computations."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from tests.legacy import flat_settings
from apm.errors import ConfigError
from apm.module import APMModule
from tests.conftest import saved_checkpoint

TINY = dict(teacher="dinov2_tiny", teacher_args={"pretrained": False}, image_size=56,
            hidden_dims=[32], pe_dim=16, level_dim=4, stats_images=1)


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    from apm.data import image_transform, skimage_photo

    return image_transform(56)(skimage_photo("astronaut"))[None]


def fitted(image, **kw) -> APMModule:
    torch.manual_seed(0)
    m = APMModule(**{**TINY, **kw})
    m.fit_statistics([image])
    return m


def test_targets_are_gathered_at_the_locations_the_student_answers(image):
    m = fitted(image, queries_per_image=24)  # 6 of 16 locations per level
    feats = m.targets(image)
    torch.manual_seed(1)
    _, logs = m.distillation_loss(image, feats)
    torch.manual_seed(1)
    locs = m.sample_locations(1, image.device)  # the same draw
    assert all(l is not None and l.shape == (1, 6) for l in locs)
    dense = m.student.dense(image)
    for i, (lvl, loc) in enumerate(zip(m.levels, locs)):
        rows, cols = loc[0] // lvl.grid[1], loc[0] % lvl.grid[1]  # row-major location index
        pred = dense[i][0, rows, cols]
        target = m.standardizer.encode(i, feats[i][0, rows, cols])
        want = ((pred - target) ** 2).mean()
        torch.testing.assert_close(logs[f"train/loss_{lvl.name}"], want, rtol=1e-4, atol=1e-6)


def test_level_and_rgb_weights_weight_the_mean_of_the_level_losses(image):
    feats = fitted(image).targets(image)
    m = fitted(image, queries_per_image=0, level_weights={"block1": 3.0, "block3": 0.0},
               rgb_weight=0.5)
    loss, logs = m.distillation_loss(image, feats)
    w = {"block1": 3.0, "block2": 1.0, "block3": 0.0, "rgb": 0.5}
    assert [l.name for l in m.levels] == list(w)
    want = sum(w[n] * logs[f"train/loss_{n}"] for n in w) / sum(w.values())
    torch.testing.assert_close(loss, want)
    plain, plain_logs = fitted(image, queries_per_image=0).distillation_loss(image, feats)
    torch.testing.assert_close(plain, sum(plain_logs[f"train/loss_{n}"] for n in w) / 4)
    assert not torch.isclose(loss, plain)


def test_rgb_in_level_weights_names_the_setting_to_use():
    with pytest.raises(ConfigError, match="model.rgb_weight"):
        APMModule(**TINY, level_weights={"rgb": 2.0})


def test_learning_rate_warms_up_linearly_then_decays_by_a_cosine():
    m = APMModule(**TINY, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    m.trainer = L.Trainer(max_steps=110, accelerator="cpu", logger=False)
    cfg = m.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(110):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    for k in range(10):
        assert lrs[k] == pytest.approx(1e-3 * (k + 1) / 10)
    for k in (10, 35, 60, 85, 109):
        t = (k - 10) / 100
        assert lrs[k] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))))
    assert lrs[10] == pytest.approx(1e-3) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_positional_code_top_frequency_follows_the_finest_grid_and_old_checkpoints_keep_64(tmp_path):
    m = APMModule(**TINY)  # 56 px / 14 = 4x4 grid: Nyquist is 2 cycles per side
    assert m.student.pe_max_freq == 2.0
    assert APMModule(**{**TINY, "image_size": 448}).student.pe_max_freq == 16.0
    assert APMModule(**TINY, pe_max_freq=5.0).student.pe_max_freq == 5.0
    # a checkpoint written before the setting existed has no pe_max_freq: it keeps 64
    path = tmp_path / "old.ckpt"
    ckpt = saved_checkpoint(m, path)
    ckpt["hyper_parameters"] = flat_settings(ckpt["hyper_parameters"], "pe_max_freq")
    torch.save(ckpt, path)
    assert APMModule.from_checkpoint(path).student.pe_max_freq == 64.0
    assert APMModule.from_checkpoint(tmp_path / "old.ckpt", pe_max_freq=None).student.pe_max_freq == 2.0


def test_a_moved_teacher_class_still_loads_its_checkpoints_and_caches(tmp_path, image):
    import json

    from apm.cache import FeatureCache, teacher_identity

    m = fitted(image)
    path = tmp_path / "m.ckpt"
    ckpt = saved_checkpoint(m, path)
    assert "class" not in ckpt["apm"]["teacher"]  # recorded by name and arguments
    ckpt["apm"]["teacher"]["class"] = "old_package.old_file.DINOv2Teacher"  # as written before
    torch.save(ckpt, path)
    APMModule.from_checkpoint(path)  # no error
    ckpt["apm"]["teacher"]["image_size"] = 112  # a real difference is still refused
    torch.save(ckpt, path)
    with pytest.raises(ConfigError, match="teacher"):
        APMModule.from_checkpoint(path)

    identity = teacher_identity("dinov2_tiny", {"pretrained": False}, m.teacher)
    FeatureCache.open(tmp_path / "c", identity, m.teacher.levels, ["astronaut"], verbose=False)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    manifest["teacher"]["describe"]["class"] = "old_package.old_file.DINOv2Teacher"
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    FeatureCache.open(tmp_path / "c", identity, m.teacher.levels, ["astronaut"], verbose=False)


def test_level_statistics_against_numpy_and_a_one_location_level_from_one_image():
    import numpy as np

    from apm.standardize import LevelStandardizer

    g = torch.Generator().manual_seed(0)
    grid = torch.randn(2, 8, 8, 5, generator=g) * 3 + 7  # a level with many locations
    one = torch.randn(1, 1, 1, 6, generator=g) * 40 + 5  # CLIP's `global`, seen in one image
    sd = LevelStandardizer([5, 6])
    sd.update([grid, one])
    sd.finalize()
    x = grid.reshape(-1, 5).double().numpy()
    np.testing.assert_allclose(sd.mean(0).numpy(), x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(sd.std(0).item(), np.sqrt(((x - x.mean(0)) ** 2).mean()), rtol=1e-5)
    # one location, one image: no spread to measure. Mean 0 and the RMS as scale, so another
    # image's embedding of the same magnitude standardizes to O(1), not to ~1e5 (a clamped std)
    other = torch.randn(1, 1, 1, 6, generator=g) * 40 + 5
    z = sd.encode(1, other)
    assert torch.all(sd.mean(1) == 0) and 0.2 < z.pow(2).mean().sqrt() < 5, z
