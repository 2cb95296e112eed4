"""Adding a teacher without touching apm/: the worked example of docs/adding_a_teacher.md, saved as
its own module outside the project, selected by "module:name" and trained through the real CLI."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import teachers.errors as teacher_errors
from apm.errors import APMError, ConfigError, TeacherUnavailableError
from apm.module import APMModule
from teachers import create_teacher

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DOC = ROOT / "docs" / "adding_a_teacher.md"


def write_example(folder) -> str:
    """Save the guide's example module (the python block after its marker) into ``folder``."""
    text = DOC.read_text()
    m = re.search(r"<!-- example: (\w+)\.py -->\s*```python\n(.*?)```", text, re.S)
    assert m, "docs/adding_a_teacher.md lost its example block"
    (folder / f"{m.group(1)}.py").write_text(m.group(2))
    return m.group(1)


def test_the_guide_example_is_a_working_teacher(tmp_path, monkeypatch):
    module = write_example(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    t = create_teacher(f"{module}:resnet_stages", image_size=128, pretrained=False,
                       levels=["layer4", 1])
    assert [(l.name, l.grid, l.dim) for l in t.levels] == [("layer4", (4, 4), 512), ("layer2", (16, 16), 128)]
    assert [tuple(f.shape) for f in t(torch.rand(2, 3, 128, 128))] == [(2, 4, 4, 512), (2, 16, 16, 128)]
    with pytest.raises(ConfigError, match="unknown teacher 'nope'"):
        create_teacher(f"{module}:nope", image_size=128)


def test_teachers_import_nothing_from_apm():
    """The dependency points one way: every teacher module imports without apm, whose user-facing
    errors are the teachers' own classes (one ``except APMError`` catches both)."""
    code = ("import sys, teachers; teachers.list_teachers(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'apm'))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
    assert (APMError, ConfigError, TeacherUnavailableError) == (
        teacher_errors.UserError, teacher_errors.ConfigError, teacher_errors.TeacherUnavailableError)


@pytest.mark.slow  # a subprocess: ~10 s of imports plus 3 steps; ~30 s on a loaded machine
def test_a_new_teacher_module_trains_through_the_cli(tmp_path, monkeypatch):
    module = write_example(tmp_path)
    run = tmp_path / "run"
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(f"""\
trainer:
  default_root_dir: {run}
  max_steps: 3
  check_val_every_n_epoch: 1
  limit_val_batches: 1
  log_every_n_steps: 1
  enable_progress_bar: false
  logger:
    - class_path: lightning.pytorch.loggers.CSVLogger
      init_args: {{save_dir: {run}, name: csv}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {run / 'checkpoints'}, save_last: true}}
data:
  image_size: 128
  max_images: 4
  batch_size: 2
""")
    env = {**os.environ, "WANDB_MODE": "offline",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "apm", "fit", "-c", str(CONFIGS / "apm.yaml"),
           "-c", str(CONFIGS / "smoke.yaml"), "-c", str(overlay),
           "--model.teacher", f"{module}:resnet_stages",
           "--model.teacher_args", "{pretrained: false, depth: 18, levels: [layer1, layer3]}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file(), proc.stdout[-2000:]

    monkeypatch.syspath_prepend(str(tmp_path))  # loading rebuilds the teacher from its module
    model = APMModule.load_from_checkpoint(ckpt, map_location="cpu")
    assert model.hparams.teacher == f"{module}:resnet_stages"
    assert [(l.name, l.grid, l.dim) for l in model.levels] == [
        ("layer1", (32, 32), 64), ("layer3", (8, 8), 256), ("rgb", (8, 8), 3)]
    res = model.evaluate(torch.rand(1, 3, 128, 128))
    assert all(torch.isfinite(v).all() for m in res.values() for v in m.values())
