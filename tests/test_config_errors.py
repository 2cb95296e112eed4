"""Every config mistake stops the command line before training with one paragraph that names the
setting (exit status 2, no traceback): through ``apm.cli.main``, the function behind ``apm``."""

import os

import pytest
import torch

from apm.checkpoints import read_checkpoint
from apm.module import APMModule
from apm.cli import main
from apm.errors import APMError, ConfigError
from tests.conftest import CONFIGS

TINY = ["-c", str(CONFIGS / "apm.yaml"), "-c", str(CONFIGS / "smoke.yaml"),
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.precision", "32-true", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
        "--trainer.num_sanity_val_steps", "0", "--trainer.enable_model_summary", "false",
        "--data.images", "skimage:astronaut,coffee", "--data.image_size", "56", "--data.val_fraction", "0",
        "--data.batch_size", "2", "--model.hidden_dims", "[64]", "--model.queries_per_image", "64",
        "--model.stats_images", "2"]
LAST = "runs/smoke/checkpoints/last.ckpt"
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter", "ignore:Checkpoint directory")


def _fails(capsys, *args: str) -> str:
    """Run ``apm fit`` in-process; assert exit 2 and return the one-paragraph error."""
    capsys.readouterr()
    assert main(["fit", *TINY, *args]) == 2
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A folder with a finished tiny run (runs/smoke/checkpoints/last.ckpt)."""
    d = tmp_path_factory.mktemp("run")
    old = os.getcwd()
    os.chdir(d)
    try:
        assert main(["fit", *TINY]) == 0
    finally:
        os.chdir(old)
    return d


def test_unknown_teacher_names_the_setting_and_the_choices(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    msg = _fails(capsys, "--model.teacher", "dinov3_huge")
    assert "'model.teacher'" in msg and "dinov2_tiny" in msg and "dinov2_small" in msg


def test_image_size_off_the_patch_grid_names_the_nearest_sizes(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    msg = _fails(capsys, "--data.image_size", "100")
    assert "'data.image_size'" in msg and "98" in msg and "112" in msg


@pytest.mark.parametrize("levels, expect", [("[7]", "0..3"), ("[block9]", "block3"), ("[1, 1]", "twice")])
def test_levels_out_of_range_name_the_setting(capsys, tmp_path, monkeypatch, levels, expect):
    monkeypatch.chdir(tmp_path)
    msg = _fails(capsys, "--model.teacher_args", f"{{pretrained: false, levels: {levels}}}")
    assert "'model.teacher_args.levels'" in msg and expect in msg


def test_unknown_level_weight_names_the_setting(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    msg = _fails(capsys, "--model.level_weights", "{block7: 2.0}")
    assert "'model.level_weights'" in msg and "block3" in msg


def test_folder_without_usable_images(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_text("not a picture")
    (tmp_path / "imgs" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    msg = _fails(capsys, "--data.images", "imgs")
    assert "'data.images'" in msg and "a.jpg" in msg and "b.png" in msg


@pytest.mark.parametrize("args, setting", [
    (["--model.hidden_dims", "[32]"], "model.student.hidden_dims"),
    (["--model.teacher_args", "{pretrained: false, seed: 1}"], "model.teacher_args"),
    (["--model.teacher", "dinov2_small", "--model.teacher_args", "{pretrained: false}"], "model.teacher"),
    (["--model.rgb", "false"], "model.rgb"),
])
def test_resuming_another_shape_or_teacher_names_the_setting(capsys, run_dir, monkeypatch, args, setting):
    monkeypatch.chdir(run_dir)
    before = torch.load(LAST, weights_only=True)["global_step"]
    msg = _fails(capsys, "--ckpt_path", "last", *args)
    assert "'ckpt_path'" in msg and "last.ckpt" in msg and f"{setting} is" in msg, msg
    assert torch.load(LAST, weights_only=True)["global_step"] == before  # untouched


def test_checkpoint_file_at_another_image_size(capsys, run_dir, monkeypatch):
    # A checkpoint file's model settings are taken from it, but the image size is the data's.
    monkeypatch.chdir(run_dir)
    msg = _fails(capsys, "--ckpt_path", str(run_dir / LAST), "--data.image_size", "112")
    assert "'ckpt_path'" in msg and "data.image_size is 56 in the checkpoint but 112 here" in msg


def test_a_student_saved_without_its_optimizer_is_no_run_to_resume(capsys, run_dir, monkeypatch):
    """apm perceive and APM.save write weights only: every tool loads them, apm fit --ckpt_path
    says why it cannot continue from one (instead of Lightning's KeyError on the optimizer)."""
    from apm.checkpoints import write_student as save_student

    monkeypatch.chdir(run_dir)
    save_student(APMModule.from_checkpoint(run_dir / LAST), run_dir / "weights.ckpt")
    assert APMModule.from_checkpoint(run_dir / "weights.ckpt").student_settings.hidden_dims == [64]
    msg = _fails(capsys, "--ckpt_path", "weights.ckpt")
    assert "'--ckpt_path'" in msg and "weights only" in msg and "APM.from_pretrained" in msg, msg


def test_from_checkpoint_for_tools(run_dir):
    m = APMModule.from_checkpoint(run_dir / LAST)
    assert m.student_settings.hidden_dims == [64] and bool(m.standardizer.ready)
    feats = m.predict_features(torch.rand(1, 3, 56, 56))
    assert [tuple(f.shape) for f in feats] == [(1, 4, 4, 32)] * 3 + [(1, 4, 4, 3)]
    with pytest.raises(ConfigError, match="'--ckpt'.*model.student.hidden_dims is \\[64\\] in the checkpoint"):
        APMModule.from_checkpoint(run_dir / LAST, hidden_dims=[32])


class _Payload:
    """Pickles as a call to os.mkdir: loading it unsafely would create a folder."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_checkpoints_with_pickled_code_are_refused_unrun(capsys, run_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "code-ran"
    ckpt = torch.load(run_dir / LAST, weights_only=True)
    ckpt["hyper_parameters"]["extra"] = _Payload(str(marker))
    torch.save(ckpt, tmp_path / "evil.ckpt")
    msg = _fails(capsys, "--ckpt_path", "evil.ckpt")
    assert "'ckpt_path'" in msg and "Python objects" in msg
    with pytest.raises(APMError, match="Python objects"):
        APMModule.from_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_truncated_checkpoint_is_a_clear_error(capsys, run_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = (run_dir / LAST).read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    msg = _fails(capsys, "--ckpt_path", "cut.ckpt")
    assert "'ckpt_path'" in msg and "not a readable checkpoint" in msg


def test_our_checkpoints_hold_only_plain_types(run_dir):
    ckpt = read_checkpoint(run_dir / LAST)  # weights_only=True
    assert ckpt["apm"]["teacher"]["model_name"] == "dinov2-tiny"
    assert ckpt["hyper_parameters"]["teacher"] == "dinov2_tiny"


def test_feature_cache_of_another_teacher_is_refused(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", *TINY, "--model.feature_cache", "cache"]) == 0
    msg = _fails(capsys, "--model.feature_cache", "cache",
                 "--model.teacher_args", "{pretrained: false, seed: 1}")
    assert "'model.feature_cache'" in msg and "another teacher" in msg


def test_an_unknown_flag_is_one_paragraph_with_the_closest_names(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["fit", *TINY, "--model.learning_rate", "1e-3"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "usage:" not in err, err[:2000]  # no usage dump
    assert "'--model.learning_rate'" in err and "did you mean --model.lr" in err, err
    assert not (tmp_path / "runs").exists()  # stopped before anything ran


def test_a_tool_flag_mistake_is_one_paragraph(capsys):
    capsys.readouterr()
    assert main(["islands", "--images", "skimage:astronaut", "--out", "x", "--perplexty", "5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: apm islands: unknown option '--perplexty' (did you mean --perplexity?)"), err
    assert len(err.strip().splitlines()) == 1


def test_a_level_flag_out_of_range_is_fixed_on_the_command_line():
    from teachers.base import select_levels

    with pytest.raises(ConfigError, match="Fix --levels on the command line"):
        select_levels(["block1", "rgb"], ["block9"], "--levels")
    with pytest.raises(ConfigError, match="Fix the list in your config"):
        select_levels(["block1", "rgb"], [7], "model.levels")
