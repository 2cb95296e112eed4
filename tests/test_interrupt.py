"""Interrupted runs continue, checkpoints survive a kill during a save, SIGTERM saves before it
exits, and a non-finite loss is skipped, counted, and stops the run after a few in a row."""

import csv
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from apm.checkpoints import AtomicCheckpointIO
from apm.data import APMDataModule
from apm.errors import NonFiniteLossError
from apm.module import APMModule
from tests.conftest import CONFIGS, ROOT

OVERLAY = """
trainer:
  accelerator: cpu
  precision: 32-true
  max_steps: {max_steps}
  default_root_dir: runs/t
  logger:
    - class_path: lightning.pytorch.loggers.CSVLogger
      init_args: {{save_dir: runs/t, name: csv, flush_logs_every_n_steps: 1}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: runs/t/checkpoints, save_top_k: 0, save_last: true, every_n_train_steps: {every}}}
  enable_progress_bar: false
  num_sanity_val_steps: 0
  limit_val_batches: 0
  log_every_n_steps: 1
model:
  hidden_dims: [64]
  pe_dim: 16
  level_dim: 8
  queries_per_image: 64
  stats_images: 4
data:
  images: skimage:astronaut,coffee,chelsea,rocket
  image_size: 56
  batch_size: 2
  val_fraction: 0
  num_workers: 0
"""
ENV = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
LAST = Path("runs/t/checkpoints/last.ckpt")


def _start(tmp_path: Path, max_steps: int, every: int, *extra: str) -> subprocess.Popen:
    (tmp_path / "t.yaml").write_text(OVERLAY.format(max_steps=max_steps, every=every))
    cmd = [sys.executable, "-m", "apm", "fit", "-c", str(CONFIGS / "apm.yaml"), "-c",
           str(CONFIGS / "smoke.yaml"), "-c", "t.yaml", *extra]
    log = open(tmp_path / f"run{len(list(tmp_path.glob('run*.log')))}.log", "w")
    return subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=log, stderr=subprocess.STDOUT)


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 300, interval: float = 0.05) -> None:
    end = time.time() + timeout
    while not cond():
        assert proc.poll() is None, "the run ended before the test could interrupt it"
        assert time.time() < end, "timed out"
        time.sleep(interval)


def _logged_steps(tmp_path: Path, version: int) -> list[int]:
    f = tmp_path / f"runs/t/csv/version_{version}/metrics.csv"
    if not f.exists():
        return []
    with open(f) as fh:
        return [int(r["step"]) for r in csv.DictReader(fh) if r.get("train/loss")]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_continues_the_run(tmp_path):
    max_steps = 24
    proc = _start(tmp_path, max_steps, every=3)
    _wait_for(lambda: (tmp_path / LAST).exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    killed = torch.load(tmp_path / LAST, weights_only=True)  # complete, even if killed mid-save
    k = killed["global_step"]
    assert 0 < k < max_steps  # 2 batches per epoch: the save at step 3 is mid-epoch

    proc = _start(tmp_path, max_steps, 3, "--ckpt_path", "last")
    assert proc.wait(600) == 0, (tmp_path / "run1.log").read_text()[-3000:]
    log = (tmp_path / "run1.log").read_text()
    assert "Restoring states from the checkpoint path" in log and "last.ckpt" in log
    final = torch.load(tmp_path / LAST, weights_only=True)
    assert final["global_step"] == max_steps
    # Optimizer and scheduler continued rather than restarted: both stepped max_steps times.
    adam = final["optimizer_states"][0]["state"]
    assert all(int(s["step"]) == max_steps for s in adam.values())
    assert final["lr_schedulers"][0]["last_epoch"] == max_steps
    # The resumed process ran only the missing steps.
    steps = _logged_steps(tmp_path, 1)
    assert len(steps) == max_steps - k and min(steps) >= k, (k, steps)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_before_exiting(tmp_path):
    proc = _start(tmp_path, 100_000, every=100_000)  # no periodic save: only SIGTERM writes last.ckpt
    _wait_for(lambda: len(_logged_steps(tmp_path, 0)) >= 2, proc)
    seen = max(_logged_steps(tmp_path, 0))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 128 + signal.SIGTERM
    log = (tmp_path / "run0.log").read_text()
    assert "Received SIGTERM: saved" in log and "--ckpt_path last" in log, log[-3000:]
    ckpt = torch.load(tmp_path / LAST, weights_only=True)
    assert ckpt["global_step"] > seen
    assert ckpt["optimizer_states"] and ckpt["lr_schedulers"][0]["last_epoch"] == ckpt["global_step"]


SAVER = """
import sys, torch
from apm.checkpoints import AtomicCheckpointIO
io, x, i = AtomicCheckpointIO(), torch.arange(4_000_000, dtype=torch.float64), 0
while True:
    i += 1
    io.save_checkpoint({"state_dict": {"x": x + i}, "i": i}, sys.argv[1])
    print(i, flush=True)
"""


def test_kill_during_atomic_save_leaves_a_loadable_checkpoint(tmp_path):
    target = tmp_path / "ckpt" / "last.ckpt"
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(target)], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL)

    def mid_save() -> bool:  # a complete checkpoint exists and the next one is half written
        return target.exists() and any(t.stat().st_size > 0 for t in target.parent.glob("*.tmp"))

    _wait_for(mid_save, proc, timeout=120, interval=0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert list(target.parent.glob(".last.ckpt.*.tmp"))  # the kill did land inside a save
    ckpt = torch.load(target, weights_only=True)
    assert ckpt["i"] >= 1
    assert torch.equal(ckpt["state_dict"]["x"], torch.arange(4_000_000, dtype=torch.float64) + ckpt["i"])
    assert [p.name for p in target.parent.glob("*.ckpt")] == ["last.ckpt"]  # no torn second file
    # The next save removes temporary files a killed writer left, and keeps the usual file mode.
    AtomicCheckpointIO().save_checkpoint({"state_dict": {}, "i": -1}, target)
    assert not list(target.parent.glob(".last.ckpt.*.tmp"))
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


# -- non-finite loss ------------------------------------------------------------------------------
def _tiny_module(**kw) -> APMModule:
    return APMModule(teacher="dinov2_tiny", teacher_args={"pretrained": False}, image_size=56,
                     hidden_dims=[64], pe_dim=16, level_dim=8, queries_per_image=64, stats_images=4, **kw)


def test_nonfinite_count_resets_on_a_finite_loss():
    m = _tiny_module(max_nonfinite_steps=3)
    results = [m.loss_is_finite(torch.tensor(v)) for v in (math.nan, math.inf, 1.0, math.nan, math.nan, 2.0)]
    assert results == [False, False, True, False, False, True]
    assert m.nonfinite_total == 4 and m.nonfinite_in_a_row == 0
    m.loss_is_finite(torch.tensor(math.nan))
    m.loss_is_finite(torch.tensor(-math.inf))
    with pytest.raises(NonFiniteLossError, match="'model.max_nonfinite_steps'"):
        m.loss_is_finite(torch.tensor(math.nan))


class _Snapshots(L.Callback):
    def __init__(self):
        self.params = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.params.append(torch.cat([p.detach().flatten().clone() for p in pl_module.student.parameters()]))


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path):
    # lr 1e30: the first update is finite but blows the weights up, so every later loss is not.
    m = _tiny_module(lr=1e30, warmup_steps=1, max_nonfinite_steps=4)
    dm = APMDataModule("skimage:astronaut,coffee", image_size=56, batch_size=2, val_fraction=0, num_workers=0)
    snaps = _Snapshots()
    trainer = L.Trainer(accelerator="cpu", max_steps=50, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=[snaps], default_root_dir=tmp_path, enable_model_summary=False)
    with pytest.raises(NonFiniteLossError) as e:
        trainer.fit(m, dm)
    assert "'model.max_nonfinite_steps'" in str(e.value) and "4 steps in a row" in str(e.value)
    assert m.nonfinite_total == 4
    # Step 1 updated the weights; the skipped steps 2..4 left them exactly as they were (AdamW
    # with zero gradients would still have moved them by its momentum).
    assert len(snaps.params) == 4 and torch.isfinite(snaps.params[0]).all()
    assert all(torch.equal(p, snaps.params[0]) for p in snaps.params[1:])


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_says_how_to_continue(tmp_path):
    proc = _start(tmp_path, 100_000, every=100_000)  # no periodic save: only the Ctrl-C writes last.ckpt
    _wait_for(lambda: len(_logged_steps(tmp_path, 0)) >= 2, proc)
    seen = max(_logged_steps(tmp_path, 0))
    proc.send_signal(signal.SIGINT)
    assert proc.wait(120) == 128 + signal.SIGINT
    log = (tmp_path / "run0.log").read_text()
    assert "Received Ctrl-C: saved" in log and "--ckpt_path last" in log, log[-3000:]
    ckpt = torch.load(tmp_path / LAST, weights_only=True)
    assert ckpt["global_step"] > seen
    # a whole step: the optimizer and the scheduler made as many steps as the trainer counted
    adam = ckpt["optimizer_states"][0]["state"]
    assert all(int(s["step"]) == ckpt["global_step"] for s in adam.values())
    assert ckpt["lr_schedulers"][0]["last_epoch"] == ckpt["global_step"]
