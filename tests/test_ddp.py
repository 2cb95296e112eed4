"""Data-parallel training (Lightning's DDP, 2 CPU processes over gloo) reaches the same student as
one process on the same data.

What makes the two runs comparable: the same global batch (1 process x 4 images, or 2 x 2) holding
the whole training set, so every step sees every image whatever the samplers' orders; every query
of every image (``queries_per_image: 0``), so no per-rank random sampling; the same seed for the
initial weights (DDP also broadcasts rank 0's); level statistics from the whole training set on
every rank; fp32. DDP averages the ranks' gradients of their half-batch mean losses, which is the
gradient of the full-batch mean loss, so only float summation order differs.
"""

import os
import subprocess
import sys

import lightning as L
import numpy as np
import pytest
import torch

from apm.module import APMModule
from tests.conftest import CONFIGS, ROOT


class RecordLocations(L.Callback):
    """Saves the query locations each rank draws at its first step to $RECORD_DIR/rank<N>.pt."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0:
            state = torch.get_rng_state()  # draw exactly what the step is about to draw
            locs = pl_module.sample_locations(1, pl_module.device)
            torch.set_rng_state(state)
            torch.save(locs, os.path.join(os.environ["RECORD_DIR"], f"rank{trainer.global_rank}.pt"))

OVERLAY = """
trainer:
  accelerator: cpu
  precision: 32-true
  max_steps: 4
  default_root_dir: runs/t
  logger: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {dirpath: runs/t/checkpoints, save_top_k: 0, save_last: true}
  enable_progress_bar: false
  num_sanity_val_steps: 0
  limit_val_batches: 0
  enable_model_summary: false
model:
  hidden_dims: [64]
  pe_dim: 16
  level_dim: 8
  queries_per_image: 0
  stats_images: 4
  warmup_steps: 1
  lr: 0.003
data:
  images: skimage:astronaut,coffee,chelsea,rocket
  image_size: 56
  val_fraction: 0
  num_workers: 0
"""


def _fit(cwd, *extra) -> dict:
    (cwd / "t.yaml").write_text(OVERLAY)
    cmd = [sys.executable, "-m", "apm", "fit", "-c", str(CONFIGS / "apm.yaml"), "-c",
           str(CONFIGS / "smoke.yaml"), "-c", "t.yaml", *extra]
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", RECORD_DIR=str(cwd),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return torch.load(cwd / "runs/t/checkpoints/last.ckpt", weights_only=True)


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    # with the teacher-feature cache: both ranks write their images into the same shard files
    one = _fit(tmp_path / "one", "--trainer.devices", "1", "--data.batch_size", "4",
               "--model.feature_cache", "cache")
    two = _fit(tmp_path / "two", "--trainer.devices", "2", "--trainer.strategy", "ddp",
               "--data.batch_size", "2", "--model.feature_cache", "cache")
    assert one["global_step"] == two["global_step"] == 4
    shards = sorted(p.name for p in (tmp_path / "one" / "cache").glob("*.npy"))
    assert "filled.npy" in shards and len(shards) == 4  # filled + 3 levels of one shard each
    for name in shards:  # every image's rows, none zeroed or overwritten by the other rank
        a, b = (np.load(tmp_path / run / "cache" / name) for run in ("one", "two"))
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=2e-3, atol=2e-3)
        assert name == "filled.npy" and a.all() or np.abs(a).reshape(len(a), -1).max(1).min() > 0

    hp = {k: v for k, v in one["hyper_parameters"].items() if not k.startswith("_")}
    L.seed_everything(0)  # the CLI's seed_everything: the same initial student
    init = APMModule(**hp).state_dict()
    for k, w1 in one["state_dict"].items():
        if not k.startswith("student."):
            assert torch.allclose(w1, two["state_dict"][k]), k  # level statistics
            continue
        moved = (w1 - init[k]).norm()
        apart = (w1 - two["state_dict"][k]).norm()
        assert moved > 0, k
        # Training moved every tensor; the two runs differ by float summation order only.
        assert apart <= 1e-3 * moved + 1e-6, (k, float(apart), float(moved))


@pytest.mark.slow
def test_ddp_ranks_sample_different_query_locations(tmp_path):
    """With sampled queries, each rank offsets the seed by its rank: otherwise both ranks would draw
    the same locations for their images every step, and half the batch would add no coverage."""
    _fit(tmp_path, "--trainer.devices", "2", "--trainer.strategy", "ddp", "--data.batch_size", "2",
         "--trainer.max_steps", "1", "--model.queries_per_image", "16",
         "--trainer.callbacks+", "tests.test_ddp.RecordLocations")
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(x is not None for x in a)  # 16 queries over 4 levels: 4 of 16 locations each
    assert any(not torch.equal(x, y) for x, y in zip(a, b))
