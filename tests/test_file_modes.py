"""Files the project writes get the modes a plain open gives (0666 minus the umask), also where a
library writes them private."""

import os

from apm.checkpoints import save_pretrained
from apm.cli import load_student
from apm.module import APMModule
from teachers.files import current_umask, usual_modes


def test_current_umask_reads_the_process_umask():
    old = os.umask(0o037)
    try:
        assert current_umask() == 0o037
    finally:
        os.umask(old)


def test_usual_modes_of_a_private_tree(tmp_path):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "f").write_text("x")
    for p in (d, d / "sub"):
        os.chmod(p, 0o700)
    os.chmod(d / "sub" / "f", 0o600)
    old = os.umask(0o022)
    try:
        usual_modes(d)
    finally:
        os.umask(old)
    assert [oct(p.stat().st_mode & 0o777) for p in (d, d / "sub", d / "sub" / "f")] == ["0o755", "0o755", "0o644"]


def test_save_pretrained_writes_shareable_files(tmp_path):
    module = APMModule(teacher="dinov2_tiny", teacher_args={"pretrained": False}, image_size=56,
                       hidden_dims=[16], pe_dim=8, level_dim=4, queries_per_image=16, stats_images=2)
    old = os.umask(0o022)
    try:
        folder = save_pretrained(module, tmp_path / "student")
    finally:
        os.umask(old)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in folder.iterdir()} == {
        "config.json": "0o644", "model.safetensors": "0o644"}
    assert load_student(folder, trained=False) is not None
