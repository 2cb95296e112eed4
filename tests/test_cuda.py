"""The CUDA paths, run only where a GPU is present (skipped on the CPU, so CI stays green):
a bf16-mixed fit and its resume through the real CLI, the island tools with --device cuda (checked
against the same checkpoint on the CPU), streaming equal to dense, torch.compile with inductor,
and the torch t-SNE on the GPU against scikit-learn's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from apm.cli import main
from apm.student import APMStudent
from teachers import Level
from tests.conftest import CONFIGS, ROOT

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def fit(root, *extra: str) -> subprocess.CompletedProcess:
    overlay = {
        "trainer": {"accelerator": "gpu", "precision": "bf16-mixed", "max_steps": 10,
                    "default_root_dir": str(root),
                    "logger": [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                                "init_args": {"save_dir": ".", "name": "csv"}}]},
        "data": {"image_size": 112, "max_images": 6, "val_fraction": 0.34},
    }
    (root / "gpu.yaml").write_text(yaml.safe_dump(overlay))
    cmd = [sys.executable, "-m", "apm", "fit", "-c", str(CONFIGS / "apm.yaml"), "-c",
           str(CONFIGS / "smoke.yaml"), "-c", str(root / "gpu.yaml"), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    proc = fit(root)
    assert "bf16" in proc.stdout + proc.stderr  # Lightning announces bf16 AMP
    last = root / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 10
    fit(root, "--trainer.max_steps", "20", "--ckpt_path", "last")  # resume on the GPU
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["global_step"] == 20
    assert all(float(s["step"]) == 20 for s in state["optimizer_states"][0]["state"].values())
    return last


def test_eval_on_cuda_matches_the_cpu(ckpt, tmp_path):
    res = {}
    for dev in ("cuda", "cpu"):
        out = tmp_path / f"{dev}.json"
        assert main(["eval", "--ckpt", str(ckpt), "--images", "skimage:astronaut,coffee",
                     "--json", str(out), "--device", dev]) == 0
        res[dev] = json.loads(out.read_text())
    for name, m in res["cpu"]["levels"].items():
        for k in ("cos", "r2", "mse"):
            assert res["cuda"]["levels"][name][k] == pytest.approx(m[k], rel=1e-3, abs=1e-3), (name, k)


def test_islands_and_interpolate_on_cuda(ckpt, tmp_path):
    out = tmp_path / "islands"
    assert main(["islands", "--ckpt", str(ckpt), "--images", "skimage:astronaut", "--out", str(out),
                 "--display", "64", "--device", "cuda"]) == 0  # t-SNE on the GPU
    assert (out / "astronaut.png").stat().st_size > 10_000
    strip = tmp_path / "interp.png"
    assert main(["interpolate", "--ckpt", str(ckpt), "--a", "skimage:astronaut", "--b",
                 "skimage:coffee", "--steps", "3", "--out", str(strip), "--device", "cuda"]) == 0
    assert strip.is_file() and strip.with_suffix(".gif").is_file()


def small_student() -> APMStudent:
    torch.manual_seed(0)
    levels = [Level("a", (16, 16), 24), Level("b", (8, 8), 12), Level("rgb", (16, 16), 3)]
    return APMStudent(levels, 224, 14, pe_dim=32, level_dim=8, hidden_dims=[128, 128]).cuda().eval()


def test_streaming_equals_dense_on_cuda(astronaut_224):
    st = small_student()
    img = astronaut_224.cuda()
    with torch.no_grad():
        dense = st.dense(img)
        ids = torch.cat([torch.full((l.num_locations,), i) for i, l in enumerate(st.levels)])
        coords = torch.cat([st.coords(i).cpu() for i in range(len(st.levels))])
        perm = torch.randperm(len(ids))
        got = st.predict_queries(img, ids[perm], coords[perm], chunk=100)
    for lvl, (d, g) in enumerate(zip(dense, got)):
        order = perm[ids[perm] == lvl]
        want = d.flatten(1, 2)[:, order - int((ids < lvl).sum())]
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-5)


def test_torch_compile_inductor_matches_eager(astronaut_224):
    st = small_student()
    img = astronaut_224.cuda()
    locs = [torch.randint(0, l.num_locations, (1, 50), device="cuda") for l in st.levels]
    with torch.no_grad():
        eager = st(img, locs)
        compiled = torch.compile(st)(img, locs)  # the default backend: inductor
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_gpu_tsne_keeps_neighbours_as_well_as_scikit_learn():
    from sklearn.manifold import TSNE, trustworthiness

    from apm.islands import embed_rgb, reduce_dims
    from teachers import create_teacher
    from apm.data import image_transform, skimage_photo

    images = torch.stack([image_transform(448)(skimage_photo("astronaut"))])
    t = create_teacher("dinov2_small", image_size=448, pretrained=False, levels=[3],
                       config_overrides={"layerscale_value": 1.0})
    x = reduce_dims(t(images)[0].reshape(-1, 384).double().numpy())  # 1,024 points
    ours = embed_rgb([x], "tsne", device="cuda")[0]
    theirs = TSNE(3, perplexity=30.0, init="pca", learning_rate=max(len(x) / 48, 10.0), random_state=0,
                  max_iter=1000, method="exact").fit_transform(x.astype(np.float32))
    t_ours, t_theirs = (trustworthiness(x, y, n_neighbors=10) for y in (ours, theirs))
    assert t_ours >= t_theirs - 0.02, (t_ours, t_theirs)
    assert np.ptp(ours, axis=0).min() > 0.5  # spread over the colour cube


def test_seeded_building_leaves_the_cuda_generator_alone_and_matches_the_cpu():
    """A fresh student (apm perceive --init fresh) of a seed is the same on a GPU as on a CPU, and
    building one neither reseeds nor disturbs the caller's CUDA generator."""
    from apm.perceive import fresh_parameters
    from teachers.base import seeded

    torch.cuda.manual_seed(1234)
    state = torch.cuda.get_rng_state()
    with seeded(0):
        torch.rand(3)
    assert torch.equal(torch.cuda.get_rng_state(), state)
    student = APMStudent([Level("a", (4, 4), 8)], image_size=56, patch_size=14, pe_dim=8, level_dim=4,
                         hidden_dims=[16])
    on_cpu = fresh_parameters(student, 7)
    on_gpu = fresh_parameters(student.cuda(), 7)
    assert torch.equal(torch.cuda.get_rng_state(), state)
    for n, p in on_cpu.items():
        torch.testing.assert_close(on_gpu[n].cpu(), p, rtol=0, atol=0, msg=n)
