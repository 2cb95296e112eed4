"""Settings of earlier versions: one function (apm.checkpoints.upgrade_settings) reads them, for
config files, command lines and checkpoints alike."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

from apm.checkpoints import upgrade_settings
from apm.cli import build_cli, upgrade_argv
from apm.errors import ConfigError
from apm.module import APMModule
from apm.students import APMStudent, GLOMStudent

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
OLD_SMOKE = {"model": {"hidden_dims": [24, 24], "pe_dim": 32, "level_dim": 8, "level_entry": "first"}}
OLD_GLOM = {"model": {"student": "glom", "glom": {"dim": 16, "hidden": 24, "iterations": 2}, "pe_dim": 32}}


def cli_module(tmp_path, monkeypatch, *configs: dict):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["apm"])
    args = ["-c", str(CONFIGS / "apm.yaml"), "-c", str(CONFIGS / "smoke.yaml")]
    for i, cfg in enumerate(configs):
        (tmp_path / f"old{i}.yaml").write_text(yaml.safe_dump(cfg))
        args += ["-c", str(tmp_path / f"old{i}.yaml")]
    return build_cli(args + ["--data.image_size", "56"], run=False).model


def test_old_config_files_build_the_student_they_always_built(tmp_path, monkeypatch):
    apm = cli_module(tmp_path, monkeypatch, OLD_SMOKE)
    assert isinstance(apm.student, APMStudent) and apm.student.level_entry == "first"
    assert [m.out_features for m in (apm.student.first, apm.student.trunk[1])] == [24, 24]
    assert apm.student.pe_dim == 32 and apm.student.level_dim == 8
    glom = cli_module(tmp_path, monkeypatch, OLD_GLOM)
    assert isinstance(glom.student, GLOMStudent)
    assert glom.student.settings["iterations"] == 2 and glom.student.dim == 16 and glom.student.pe_dim == 32
    assert glom.hparams.student["class_path"].endswith("GLOMSettings")


def test_old_command_line_settings_are_rewritten():
    assert upgrade_argv(["fit", "--model.hidden_dims", "[8]", "--model.student", "glom", "--model.lr", "1"]) == [
        "fit", "--model.student.hidden_dims", "[8]", "--model.student", "apm.students.glom.GLOMSettings",
        "--model.lr", "1"]
    assert upgrade_argv(["--model.glom", "{dim: 4}"]) == ["--model.student.dim", "4"]


def test_checkpoint_settings_get_the_defaults_they_were_trained_with():
    old = {"teacher": "dinov2_tiny", "hidden_dims": [32], "pe_dim": 16, "level_dim": 4}  # before both settings
    init = upgrade_settings(old, complete=True)["student"]["init_args"]
    assert init["pe_max_freq"] == 64.0 and init["level_entry"] == "first" and init["hidden_dims"] == [32]
    # a config file that leaves them out gets today's defaults instead
    assert upgrade_settings({"hidden_dims": [32]}) == {"student": {"hidden_dims": [32]}}
    glom = upgrade_settings({"student": "glom", "glom": {"dim": 8}, "pe_dim": 16, "hidden_dims": [9],
                             "pe_max_freq": None, "level_entry": "late"}, complete=True)["student"]
    assert glom["class_path"].endswith("GLOMSettings") and glom["init_args"]["dim"] == 8
    assert "hidden_dims" not in glom["init_args"]  # APM's settings never applied to GLOM
    with pytest.raises(ConfigError, match="'model.glom' is given but 'model.student' is 'apm'"):
        upgrade_settings({"student": "apm", "glom": {"dim": 8}})
    with pytest.raises(ConfigError, match="'model.glom'.*'depth'"):
        upgrade_settings({"student": "glom", "glom": {"depth": 3}})


@pytest.mark.parametrize("name", ["single_dinov2_tiny", "single_mvitv2_tiny"])
def test_checkpoints_of_earlier_versions_load(name):
    path = ROOT / "tests" / "data" / f"{name}.ckpt"
    saved = torch.load(path, weights_only=True)
    assert "hidden_dims" in saved["hyper_parameters"]  # written in the flat form
    module = APMModule.from_checkpoint(path, trained=True)
    assert module.student_settings.hidden_dims == saved["hyper_parameters"]["hidden_dims"]
    torch.testing.assert_close(module.student.column.weight, saved["state_dict"]["student.column.weight"])
