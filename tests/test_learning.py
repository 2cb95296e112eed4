"""Learning claim: the student reproduces a teacher's features on a real photograph."""

import lightning as L
import pytest
import torch

from apm.data import APMDataModule
from apm.module import APMModule


@pytest.mark.slow
def test_student_fits_every_level_of_a_tiny_dinov2_on_one_photograph():
    """300 steps on the astronaut photograph, every location of every level each step.

    R^2 scores a prediction constant over locations at most 0 (deep layers of a random teacher can
    be nearly constant, where raw cosine is high for anything), so R^2 is the main bar; the issue
    asked for R^2 > 0.8 and cosine > 0.9, and this recipe clears 0.93 and 0.96, so the bars are
    raised to 0.9 and 0.95.
    """
    L.seed_everything(0)
    model = APMModule(teacher="dinov2_tiny", teacher_args={"pretrained": False}, image_size=224,
                      hidden_dims=[256, 256, 256], pe_dim=128, level_dim=16, queries_per_image=0,
                      lr=1e-3, warmup_steps=20, stats_images=1)
    data = APMDataModule(images="skimage:astronaut", image_size=224, batch_size=1, val_fraction=0,
                         num_workers=0)
    trainer = L.Trainer(max_steps=300, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, data)
    data.setup()
    image = data.val_set.image(0)[None]
    res = model.evaluate(image)
    untrained = APMModule(**{**model.hparams, "lr": 0.0})
    untrained.standardizer.load_state_dict(model.standardizer.state_dict())
    before = untrained.evaluate(image)
    for name, m in res.items():
        assert m["r2"].item() > 0.9, (name, m)
        assert before[name]["r2"].item() < 0.5  # the bar means something: untrained fails it
        if name != "rgb":  # raw cosine of colours is ill-posed near black; R^2 covers rgb
            assert m["cos"].item() > 0.95, (name, m)
            assert m["cos_centered"].item() > 0.9, (name, m)


def test_bf16_mixed_training_learns_on_any_cpu():
    """The bf16-mixed path, the default on CPUs with avx512_bf16 or AMX, forced here whatever the
    CPU (PyTorch emulates bf16 where it is not native): the student really runs in bf16 and still
    learns every level of one photograph."""
    L.seed_everything(0)
    model = APMModule(teacher="dinov2_tiny", teacher_args={"pretrained": False}, image_size=112,
                      hidden_dims=[128, 128], pe_dim=64, level_dim=8, queries_per_image=0,
                      lr=3e-3, warmup_steps=10, stats_images=1)
    data = APMDataModule(images="skimage:astronaut", image_size=112, batch_size=1, val_fraction=0,
                         num_workers=0)
    dtypes = set()
    model.student.register_forward_hook(lambda m, i, out: dtypes.update(o.dtype for o in out) if m.training else None)
    trainer = L.Trainer(max_steps=150, accelerator="cpu", precision="bf16-mixed", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, data)
    assert dtypes == {torch.bfloat16}  # autocast was on in every training step
    data.setup()
    res = model.evaluate(data.val_set.image(0)[None])
    for name, m in res.items():
        assert m["r2"].item() > 0.9, (name, m)  # 0.97 measured; fp32 0.98
