"""What a run leaves behind: a checkpoint folder that holds the newest run's files when a config
is run again."""

import torch

from apm.cli import build_cli
from tests.conftest import CONFIGS


def _fit(tmp_path, monkeypatch, steps: int, *extra: str) -> None:
    monkeypatch.chdir(tmp_path)
    build_cli(["fit", "-c", str(CONFIGS / "apm.yaml"), "-c", str(CONFIGS / "smoke.yaml"),
               "--trainer.max_steps", str(steps), "--trainer.logger", "false", "--trainer.enable_progress_bar",
               "false", "--trainer.check_val_every_n_epoch", "1", "--data.max_images", "4",
               "--model.hidden_dims", "[32]", "--data.image_size", "56", *extra])


def test_running_a_config_again_keeps_one_last_and_one_best(tmp_path, monkeypatch):
    folder = tmp_path / "runs/smoke/checkpoints"
    _fit(tmp_path, monkeypatch, 2)
    first = sorted(p.name for p in folder.glob("*.ckpt"))
    assert "last.ckpt" in first and len(first) == 2  # last and one best
    _fit(tmp_path, monkeypatch, 4)
    names = sorted(p.name for p in folder.glob("*.ckpt"))
    assert len(names) == 2 and "last.ckpt" in names and not any("-v1" in n for n in names), names
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 4  # the new run's
    assert sorted(p.name for p in (folder / "previous").glob("*.ckpt")) == first  # the earlier run's, kept
    # resuming moves nothing and still writes last.ckpt itself
    _fit(tmp_path, monkeypatch, 6, "--ckpt_path", "last")
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 6
    assert sorted(p.name for p in (folder / "previous").glob("*.ckpt")) == first
    assert not list(folder.glob("*-v1.ckpt"))
