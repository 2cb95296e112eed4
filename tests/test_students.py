"""One check over every registered student (as timm's test_models.py runs one over every model):
it trains with a real Lightning Trainer on a tiny random teacher and real photographs, answers
queries consistently, saves and loads in every checkpoint kind, and fits a new image with
``apm.perceive``."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from apm.checkpoints import save_pretrained, write_student
from apm.data import APMDataModule, read_images
from apm.module import APMModule
from apm.perceive import FitRecipe, perceive_images
from apm.students import Student, list_students, settings_record, student_settings

SIZE = 56
# small settings per student (a student registered without an entry here runs with its defaults)
SMALL = {"apm": {"hidden_dims": [32, 32], "pe_dim": 16, "level_dim": 4},
         "glom": {"dim": 16, "hidden": 16, "iterations": 1, "pe_dim": 16}}


def small_module(name: str) -> APMModule:
    torch.manual_seed(0)
    settings = student_settings({"name": name, **SMALL.get(name, {})})
    return APMModule(teacher="dinov2_tiny", teacher_args={"pretrained": False}, image_size=SIZE,
                     student=settings, queries_per_image=0, stats_images=2, lr=3e-3, warmup_steps=1)


@pytest.fixture(scope="module", params=list_students())
def trained(request, tmp_path_factory):
    module = small_module(request.param)
    data = APMDataModule(images="skimage:astronaut,coffee", image_size=SIZE, batch_size=2, num_workers=0)
    trainer = L.Trainer(max_steps=30, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, enable_model_summary=False)
    images = torch.stack([p.image for p in read_images(["skimage:astronaut,coffee"], SIZE)])
    module.eval()
    before = module.evaluate(images)
    module.train()
    trainer.fit(module, data)
    return request.param, module.eval(), images, before, tmp_path_factory.mktemp(request.param)


def mean_r2(res: dict) -> float:
    return torch.stack([m["r2"].mean() for m in res.values()]).mean().item()


def test_the_student_trains_and_keeps_its_interface(trained):
    name, module, images, before, _ = trained
    assert isinstance(module.student, Student) and type(module.student_settings).name == name
    after = module.evaluate(images)
    assert mean_r2(after) > mean_r2(before) + 0.3, (mean_r2(before), mean_r2(after))
    parts = module.student.parts()
    names = [n for n, _ in module.student.named_parameters()]
    assert all(any(n.startswith(p) for p in parts["body"] + parts["heads"]) for n in names)
    assert not any(n.startswith(parts["body"]) for n in names if n.startswith("heads."))


def test_queries_agree_with_the_dense_answers(trained):
    _, module, images, _, _ = trained
    st = module.student
    with torch.no_grad():
        dense = st.dense(images)
        for lvl in range(len(module.levels)):
            h, w = module.levels[lvl].grid
            at = st.query(images, lvl, st.coords(lvl), chunk=5)
            torch.testing.assert_close(at, dense[lvl].reshape(len(images), h * w, -1), rtol=1e-4, atol=1e-5)
            picked = torch.tensor([[0, h * w - 1]] * len(images))
            (fwd,) = st(images, [picked], [lvl])
            torch.testing.assert_close(fwd, at[:, [0, h * w - 1]], rtol=1e-4, atol=1e-5)
        ids = torch.tensor([0, len(module.levels) - 1, 0])
        coords = torch.tensor([[0.3, 0.6], [0.5, 0.5], [0.9, 0.1]])
        streamed = st.predict_queries(images, ids, coords, chunk=2)
        torch.testing.assert_close(streamed[0], st.query(images, 0, coords[[0, 2]]), rtol=1e-4, atol=1e-5)
        # one query-and-decode: the teacher's scale is the standardizer's decoding of the answer
        feats = module.query_features(0, coords, images)
        torch.testing.assert_close(feats, module.standardizer.decode(0, st.query(images, 0, coords)))


def test_every_checkpoint_kind_loads_the_same_student(trained):
    name, module, images, _, folder = trained
    want = module.predict_features(images)
    write_student(module, folder / "student.ckpt")
    save_pretrained(module, folder / "pretrained")
    for path in (folder / "student.ckpt", folder / "pretrained"):
        loaded = APMModule.from_checkpoint(path, trained=True)
        assert loaded.hparams.student == settings_record(module.student_settings)
        for a, b in zip(loaded.predict_features(images), want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_fit_to_a_new_image_raises_its_r2(trained):
    _, module, _, _, _ = trained
    image = read_images(["skimage:chelsea"], SIZE)[0].image[None]
    recipe = FitRecipe(init="trained", target_r2=0.99, max_steps=20, eval_every=10)
    (_, after, rec), = perceive_images(module, image, [0], recipe, progress=False)
    assert rec["steps"] > 0 and rec["r2_mean_after"] > rec["r2_mean_before"] + 0.05, rec
