"""The README's smoke run through the real command line, and resuming it with --ckpt_path last."""

import subprocess
import sys

import torch

from tests.conftest import CONFIGS


def _fit(cwd, *extra):
    cmd = [sys.executable, "-m", "apm", "fit", "-c", str(CONFIGS / "apm.yaml"),
           "-c", str(CONFIGS / "smoke.yaml"), *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_smoke_run_writes_a_checkpoint_and_resumes_with_optimizer_and_step(tmp_path):
    # 2 images a batch of 4 -> 2 steps an epoch, validation every 5 epochs: checkpoints at 10, 20.
    stdout = _fit(tmp_path, "--trainer.max_steps", "10")
    last = tmp_path / "runs/smoke/checkpoints/last.ckpt"
    assert f"checkpoint (last): {last}" in stdout
    first = torch.load(last, map_location="cpu", weights_only=True)
    assert first["global_step"] == 10
    assert (tmp_path / "runs/smoke/csv").is_dir()  # the CSV log always exists

    _fit(tmp_path, "--trainer.max_steps", "20", "--ckpt_path", "last")
    second = torch.load(last, map_location="cpu", weights_only=True)
    assert second["global_step"] == 20  # continued from 10, not restarted
    assert second["lr_schedulers"][0]["last_epoch"] == 20
    state = second["optimizer_states"][0]["state"]
    assert all(float(s["step"]) == 20 for s in state.values())  # Adam moments carried over
    assert second["epoch"] > first["epoch"]
    # the level statistics were restored, not recomputed from scratch
    for k, v in first["state_dict"].items():
        if k.startswith("standardizer.") and "mean_" in k:
            assert torch.equal(v, second["state_dict"][k]), k
