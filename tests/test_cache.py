"""The teacher-feature cache: a round trip on disk, reuse by a later run that then skips the teacher,
and refusal of a cache written by another teacher or for other images."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch

from apm.cache import FeatureCache, estimate_bytes, teacher_identity
from apm.data import APMDataModule, ImageDataset
from apm.errors import ConfigError
from apm.module import APMModule
from teachers import create_teacher

PHOTOS = ["astronaut", "coffee", "chelsea"]


def teacher(seed: int = 0):
    return create_teacher("dinov2_tiny", image_size=56, seed=seed)


def photos() -> torch.Tensor:
    ds = ImageDataset(PHOTOS, 56)
    return torch.stack([ds.image(i) for i in range(len(ds))])


def open_cache(root, t, images=PHOTOS, **kw) -> FeatureCache:
    return FeatureCache.open(root, teacher_identity("dinov2_tiny", {"seed": 0}, t), t.levels,
                             images, **kw)


def test_round_trip_float16_shards_and_manifest(tmp_path, capsys):
    t = teacher()
    cache = open_cache(tmp_path / "c", t, shard_size=2)
    out = capsys.readouterr().out
    size = estimate_bytes(t.levels, 3)
    assert f"3 images x {len(t.levels)} levels" in out and "KB" in out  # size printed up front
    assert size == 3 * 2 * sum(l.grid[0] * l.grid[1] * l.dim for l in t.levels)
    feats = t(photos())
    assert not cache.has([0, 1, 2]).any()
    cache.write(torch.tensor([2, 0]), [f[[2, 0]] for f in feats])
    assert cache.has([0, 1, 2]).tolist() == [True, False, True]
    for got, want in zip(cache.read([0, 2]), feats):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want[[0, 2]], rtol=2e-3, atol=2e-3)  # float16 storage
    # on disk: float16 .npy shards of 2 images, loadable without pickle, and a JSON manifest
    shards = sorted(p.name for p in (tmp_path / "c").glob("*.npy") if p.name != "filled.npy")
    assert shards == sorted(f"{l.name}-{k:05d}.npy" for l in t.levels for k in (0, 1))
    arr = np.load(tmp_path / "c" / shards[0], mmap_mode="r", allow_pickle=False)
    assert arr.dtype == np.float16 and arr.shape[0] in (1, 2)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["images"] == PHOTOS
    assert manifest["teacher"]["name"] == "dinov2_tiny"
    assert manifest["teacher"]["describe"]["image_size"] == 56
    # reopened: the same features, nothing rewritten
    again = open_cache(tmp_path / "c", teacher(), verbose=False)
    assert again.has([0, 1, 2]).tolist() == [True, False, True]
    torch.testing.assert_close(again.read([2])[0], cache.read([2])[0])


def test_refuses_another_teacher_or_other_images(tmp_path):
    open_cache(tmp_path / "c", teacher(), verbose=False)
    with pytest.raises(ConfigError, match="model.feature_cache.*another teacher.*weights"):
        open_cache(tmp_path / "c", teacher(seed=1))  # same architecture, other weights
    other = create_teacher("dinov2_tiny", image_size=28)
    with pytest.raises(ConfigError, match="another teacher.*describe"):
        FeatureCache.open(tmp_path / "c", teacher_identity("dinov2_tiny", {"seed": 0}, other),
                          other.levels, PHOTOS)
    with pytest.raises(ConfigError, match="another image list.*1 images not in the cache"):
        open_cache(tmp_path / "c", teacher(), images=PHOTOS[:2] + ["rocket"])
    with pytest.raises(ConfigError, match="same images in another order"):
        open_cache(tmp_path / "c", teacher(), images=PHOTOS[::-1])


class CountTeacherCalls(L.Callback):
    """Counts the teacher's forward calls during training epochs (a real forward hook)."""

    def setup(self, trainer, pl_module, stage):
        self.calls: list[int] = []  # per training epoch; level statistics come before any epoch
        pl_module.teacher.register_forward_hook(self.count)

    def count(self, *args):
        if self.calls:
            self.calls[-1] += 1

    def on_train_epoch_start(self, trainer, pl_module):
        self.calls.append(0)


def fit(tmp_path, cache, epochs=2, seed=0, hflip=False):
    torch.manual_seed(0)
    model = APMModule(teacher="dinov2_tiny", teacher_args={"seed": seed}, image_size=56,
                      hidden_dims=[32], pe_dim=8, level_dim=4, queries_per_image=64,
                      stats_images=2, feature_cache=str(cache))
    data = APMDataModule(images="skimage:" + ",".join(PHOTOS), image_size=56, batch_size=2,
                         val_fraction=0, num_workers=0, hflip=hflip)
    counter = CountTeacherCalls()
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[counter], default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data)
    return model, counter.calls


def test_training_fills_the_cache_once_then_skips_the_teacher(tmp_path):
    cache = tmp_path / "cache"
    model, calls = fit(tmp_path, cache)
    assert calls == [2, 0]  # epoch 1: two batches through the teacher; epoch 2: none
    assert model.feature_cache.complete
    # the cached targets are the teacher's, up to float16
    images = photos()
    idx = torch.tensor([PHOTOS.index(s) for s in model.trainer.datamodule.train_set.sources])
    for got, want in zip(model.targets(images[idx], torch.arange(3)), model.targets(images[idx])):
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
    # a later run with the same teacher and images never runs the teacher in training
    _, calls = fit(tmp_path, cache, epochs=1)
    assert calls == [0]
    # ... and one with another teacher is refused before training
    with pytest.raises(ConfigError, match="another teacher"):
        fit(tmp_path, cache, epochs=1, seed=1)
    with pytest.raises(ConfigError, match="hflip"):
        fit(tmp_path, tmp_path / "other", epochs=1, hflip=True)
