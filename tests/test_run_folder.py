"""What a run shows and leaves behind: one bar over all its steps with an ETA, an estimate of its
total time, and a checkpoint folder that holds the newest run's files when a config is run again."""

import re

import lightning as L
import pytest
import torch

from apm.callbacks import add_defaults
from apm.cli import build_cli
from apm.data import APMDataModule
from apm.module import APMModule
from apm.progress import StepProgressBar, TimeEstimate, describe_seconds
from tests.conftest import CONFIGS


def _module() -> APMModule:
    return APMModule(teacher="dinov2_tiny", teacher_args={"pretrained": False}, image_size=56,
                     hidden_dims=[32], pe_dim=16, level_dim=8, queries_per_image=32, stats_images=4)


def _data() -> APMDataModule:
    # 3 photographs, batch 2: 2 batches an epoch, so steps and batches of an epoch differ
    return APMDataModule("skimage:astronaut,coffee,chelsea", image_size=56, batch_size=2,
                         val_fraction=0, num_workers=0)


class _Watch(L.Callback):
    """What the step bar shows after each training step."""

    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, *_):
        bar = next(c for c in trainer.callbacks if isinstance(c, StepProgressBar)).train_progress_bar
        self.seen.append((bar.n, bar.total, str(bar)))


def _trainer(tmp_path, max_steps, *callbacks, **kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, limit_val_batches=0,
                     num_sanity_val_steps=0, default_root_dir=tmp_path, enable_model_summary=False,
                     callbacks=list(callbacks), **kw)


def test_the_bar_counts_steps_of_the_run_with_an_eta_and_continues_on_resume(tmp_path, capsys):
    watch = _Watch()
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "c", save_last=True, save_top_k=0)
    bar = StepProgressBar()
    _trainer(tmp_path, 5, bar, watch, ckpt).fit(_module(), _data())
    assert [(n, total) for n, total, *_ in watch.seen] == [(i, 5) for i in range(1, 6)]
    # across the epoch boundary (2 batches an epoch) the count goes on, and tqdm shows an ETA
    text = watch.seen[3][2]
    assert text.startswith("step") and re.search(r" 4/5 \[\d\d:\d\d<\d\d:\d\d, ", text), text

    resumed = _Watch()
    _trainer(tmp_path, 8, StepProgressBar(), resumed, ckpt).fit(_module(), _data(), ckpt_path="last")
    assert [(n, total) for n, total, *_ in resumed.seen] == [(6, 8), (7, 8), (8, 8)]


def test_time_estimate_reports_the_remaining_time_and_advises_a_gpu(tmp_path, capsys):
    est = TimeEstimate(skip=1, min_steps=2, min_seconds=0.0)
    _trainer(tmp_path, 6, est, enable_progress_bar=False, enable_checkpointing=False).fit(_module(), _data())
    err = capsys.readouterr().err
    per_step = est.estimate["seconds_per_step"]
    assert 0 < per_step < 60
    # timed after step 1 (skipped) over steps 2..3, reported at step 3: 3 of 6 left
    assert abs(est.estimate["seconds_left"] - 3 * per_step) < 1e-9
    assert "s a training step on cpu; the remaining 3 of 6 steps take about" in err
    assert "GPU is advised" not in err

    # a run long enough on a CPU is told a GPU is advised
    long = TimeEstimate(skip=1, min_steps=2, min_seconds=0.0)
    _trainer(tmp_path, 10**7, long, _StopOnEstimate(long), enable_progress_bar=False,
             enable_checkpointing=False).fit(_module(), _data())
    assert "A GPU is advised" in capsys.readouterr().err


class _StopOnEstimate(L.Callback):
    def __init__(self, est):
        self.est = est

    def on_train_batch_end(self, trainer, *_):
        trainer.should_stop = self.est.estimate is not None


def test_describe_seconds():
    assert [describe_seconds(s) for s in (12, 600, 5 * 3600, 6 * 86400)] == ["12 s", "10 min", "5.0 h", "6.0 days"]


def test_defaults_add_the_step_bar_only_where_a_bar_is_wanted():
    _, with_bar = add_defaults(None, None)
    _, without = add_defaults(None, None, progress_bar=False)
    assert any(isinstance(c, StepProgressBar) for c in with_bar)
    assert not any(isinstance(c, L.pytorch.callbacks.ProgressBar) for c in without)
    assert any(isinstance(c, TimeEstimate) for c in without)


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
