"""Pretrained DINOv2 from a local folder written by ``save_pretrained``: the class (with or without
registers) comes from the checkpoint's own config, never from the folder's name, and the levels are
the saved model's own hidden states. Runs offline (HF_HUB_OFFLINE=1, tests/conftest.py)."""

from pathlib import Path

import pytest
import torch
import transformers
from einops import rearrange

from apm.errors import ConfigError, TeacherUnavailableError
from teachers import create_teacher
from teachers.dinov2 import DINOv2Teacher

TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, mlp_ratio=2, patch_size=14,
            image_size=56, layerscale_value=1.0)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def save_tiny(folder: Path, registers: int) -> transformers.PreTrainedModel:
    """Save a tiny random DINOv2 (with ``registers`` register tokens if any) into ``folder``."""
    if registers:
        config = transformers.Dinov2WithRegistersConfig(**TINY, num_register_tokens=registers)
        model = transformers.Dinov2WithRegistersModel(config)
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**TINY))
    model.save_pretrained(folder)
    return model.eval()


# Folder names that say the opposite of what the checkpoint holds.
@pytest.mark.parametrize("folder, registers", [("dinov2-with-registers-tiny", 0), ("plain-dinov2", 4)])
def test_a_local_folder_loads_as_the_class_its_config_names(tmp_path, folder, registers):
    saved = save_tiny(tmp_path / folder, registers)
    t = DINOv2Teacher(model_name=str(tmp_path / folder), pretrained=True, image_size=56,
                      levels=[0, 1, 2, 3])
    assert type(t.model) is type(saved)
    assert t.num_prefix == 1 + registers and t.describe()["prefix_tokens"] == 1 + registers

    x = torch.rand(2, 3, 56, 56)
    with torch.no_grad():
        hidden = saved(pixel_values=(x - MEAN) / STD, output_hidden_states=True).hidden_states
    expected = [rearrange(h[:, 1 + registers:], "b (h w) d -> b h w d", h=4, w=4) for h in hidden]
    for got, want in zip(t(x), expected, strict=True):
        torch.testing.assert_close(got, want)


def test_registry_names_do_not_override_the_checkpoint(tmp_path):
    save_tiny(tmp_path / "registers-tiny", 0)
    save_tiny(tmp_path / "plain-tiny", 4)
    plain = create_teacher("dinov2_small_reg", model_name=str(tmp_path / "registers-tiny"), image_size=56)
    regs = create_teacher("dinov2_small", model_name=str(tmp_path / "plain-tiny"), image_size=56)
    assert type(plain.model) is transformers.Dinov2Model and plain.num_prefix == 1
    assert type(regs.model) is transformers.Dinov2WithRegistersModel and regs.num_prefix == 5


@pytest.mark.parametrize("content", ["nothing", "config only"])
def test_a_folder_without_a_model_gives_one_paragraph(tmp_path, content):
    folder = tmp_path / "no-model"
    folder.mkdir()
    if content == "config only":
        transformers.Dinov2Config(**TINY).save_pretrained(folder)
    with pytest.raises(TeacherUnavailableError) as e:
        DINOv2Teacher(model_name=str(folder), pretrained=True, image_size=56)
    msg = str(e.value)
    assert "\n" not in msg and str(folder) in msg
    assert "model.teacher_args.model_name" in msg and "save_pretrained" in msg


def test_a_non_dinov2_checkpoint_or_registers_with_weights_are_config_errors(tmp_path):
    vit = transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=1,
                                                       num_attention_heads=2, intermediate_size=64))
    vit.save_pretrained(tmp_path / "vit")
    with pytest.raises(ConfigError, match="model.teacher_args.model_name.*'vit'"):
        DINOv2Teacher(model_name=str(tmp_path / "vit"), pretrained=True, image_size=56)
    save_tiny(tmp_path / "plain", 0)
    with pytest.raises(ConfigError, match="registers"):
        DINOv2Teacher(model_name=str(tmp_path / "plain"), pretrained=True, image_size=56, registers=4)
