"""The teacher's precision does not follow trainer.precision: under bf16-mixed the targets, level
statistics and cached features are the fp32 ones, unless ``model.teacher_precision`` asks otherwise."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from apm.cache import FeatureCache
from apm.data import APMDataModule
from apm.errors import ConfigError
from apm.module import APMModule

TINY = dict(teacher="dinov2_tiny", teacher_args={"pretrained": False}, hidden_dims=[32],
            pe_dim=16, level_dim=4, queries_per_image=64, warmup_steps=1, stats_images=4)


def fit(tmp_path, precision: str, teacher_precision: str = "32") -> APMModule:
    L.seed_everything(0, verbose=False)
    model = APMModule(**TINY, image_size=56, teacher_precision=teacher_precision,
                      feature_cache=str(tmp_path / f"cache-{precision}-{teacher_precision}"))
    data = APMDataModule(image_size=56, batch_size=2, val_fraction=0, max_images=4, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=2,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    return model


def cached(model: APMModule) -> list[torch.Tensor]:
    cache: FeatureCache = model.feature_cache
    assert bool(cache.has(range(4)).all())
    return cache.read(range(4))


def stats(model: APMModule) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.startswith("standardizer.")}


def test_bf16_mixed_training_computes_the_same_targets_statistics_and_cache_as_fp32(tmp_path):
    fp32, bf16 = fit(tmp_path, "32-true"), fit(tmp_path, "bf16-mixed")
    for a, b in zip(cached(fp32), cached(bf16)):  # filled inside the training steps, under autocast
        assert torch.equal(a, b)
    sa, sb = stats(fp32), stats(bf16)
    assert sa.keys() == sb.keys() and len(sa) > 0
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    # the option is real: a bf16 teacher gives other (close) features and its own cache identity
    low = fit(tmp_path, "32-true", teacher_precision="bf16")
    diffs = [float((a - b).norm() / b.norm()) for a, b in zip(cached(low), cached(fp32))]
    assert all(0 < d < 0.05 for d in diffs), diffs
    assert low.feature_cache.manifest["teacher"]["precision"] == "bf16"
    assert "precision" not in fp32.feature_cache.manifest["teacher"]


def test_targets_inside_an_autocast_region_equal_those_outside(astronaut_224):
    model = APMModule(**TINY, image_size=224)
    plain = model.targets(astronaut_224)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = model.targets(astronaut_224)
    assert all(torch.equal(a, b) and b.dtype == torch.float32 for a, b in zip(plain, inside))
    model.teacher.set_precision("bf16")
    low = model.targets(astronaut_224)
    assert any(not torch.equal(a, b) for a, b in zip(plain, low))


def test_a_cache_of_a_bf16_teacher_is_refused_by_an_fp32_run(tmp_path):
    low = fit(tmp_path, "32-true", teacher_precision="bf16")
    model = APMModule(**TINY, image_size=56, teacher_precision="32",
                      feature_cache=str(low.feature_cache.root))
    with pytest.raises(ConfigError, match="precision"):
        model.open_feature_cache(low.feature_cache.manifest["images"])


def test_an_unknown_teacher_precision_names_the_setting():
    with pytest.raises(ConfigError, match="model.teacher_precision"):
        APMModule(**TINY, image_size=56, teacher_precision="fp8")
