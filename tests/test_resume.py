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
    assert "args parameter is intended" not in out.stderr  # the CLI hands its arguments over once
    return out.stdout


def test_smoke_run_writes_a_checkpoint_and_resumes_with_optimizer_and_step(tmp_path):
    # 2 images a batch of 4 -> 2 steps an epoch, validation every 5 epochs: checkpoints at 10, 20.
    stdout = _fit(tmp_path, "--trainer.max_steps", "10")
    last = tmp_path / "runs/smoke/checkpoints/last.ckpt"
    assert f"checkpoint (last): {last}" in stdout
    first = torch.load(last, map_location="cpu", weights_only=True)
    assert first["global_step"] == 10
    assert (tmp_path / "runs/smoke/csv").is_dir()  # the CSV log always exists

    # resumed on other photographs: statistics recomputed from them would differ from the first
    # run's, restored ones are equal
    _fit(tmp_path, "--trainer.max_steps", "20", "--ckpt_path", "last",
         "--data.images", "skimage:coffee,rocket,hubble_deep_field")
    second = torch.load(last, map_location="cpu", weights_only=True)
    assert second["global_step"] == 20  # continued from 10, not restarted
    assert second["lr_schedulers"][0]["last_epoch"] == 20
    state = second["optimizer_states"][0]["state"]
    assert all(float(s["step"]) == 20 for s in state.values())  # Adam moments carried over
    assert second["epoch"] > first["epoch"]
    # the level statistics were restored, not recomputed from the new photographs
    stats = [k for k in first["state_dict"] if k.startswith("standardizer.")]
    assert any("mean_" in k for k in stats)
    for k in stats:
        assert torch.equal(first["state_dict"][k], second["state_dict"][k]), k
