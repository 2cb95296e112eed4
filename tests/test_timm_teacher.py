"""The generic timm teacher: levels read from the model, prefix tokens (CLS, registers) removed,
tokens in place. Tiny random ViTs of the DINOv2 architectures (with and without 4 registers)."""

import pytest
import torch
from einops import rearrange

from apm.errors import ConfigError
from teachers import create_teacher

# init_values: layer scale 1 instead of the released 1e-5, so random blocks are not near identity
TINY = {"depth": 2, "embed_dim": 48, "num_heads": 2, "init_values": 1.0}
REG4 = "vit_small_patch14_reg4_dinov2.lvd142m"
PLAIN = "vit_small_patch14_dinov2.lvd142m"


def tiny_vit(name=REG4, image_size=112, **kw):
    return create_teacher("timm", model_name=name, pretrained=False, image_size=image_size,
                          model_args=TINY, **kw)


@pytest.mark.parametrize("name, prefix", [(REG4, 5), (PLAIN, 1)])
def test_levels_are_read_from_the_model(name, prefix):
    t = tiny_vit(name)
    assert t.num_prefix == prefix and t.patch_size == 14
    assert [(l.name, l.grid, l.dim) for l in t.levels] == [("block1", (8, 8), 48), ("block2", (8, 8), 48)]
    assert [tuple(f.shape) for f in t(torch.rand(2, 3, 112, 112))] == [(2, 8, 8, 48)] * 2
    assert t.describe()["prefix_tokens"] == prefix


@pytest.mark.parametrize("row, col", [(3, 5), (0, 0), (7, 7)])
def test_perturbing_one_patch_changes_only_its_embedding_token(row, col):
    """With [CLS, 4 registers, patches] in the sequence, keeping the wrong slice would move the
    changed token (or lose the last patches, as the official APM dump does)."""
    t = tiny_vit(levels=["embed", "block2"])
    assert t.num_prefix == 5
    x = torch.rand(1, 3, 112, 112)
    p = t.patch_size
    y = x.clone()
    y[..., row * p:(row + 1) * p, col * p:(col + 1) * p] = torch.rand(3, p, p)
    (ex, bx), (ey, by) = t(x), t(y)
    changed = (ex[0] - ey[0]).abs().amax(-1) > 1e-6
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[row, col] = True
    assert torch.equal(changed, expected)
    assert ((bx[0] - by[0]).abs().amax(-1) > 1e-6).sum() > 1  # attention spreads it further up


@pytest.mark.parametrize("height, width", [(56, 84), (84, 56)])
def test_non_square_images_with_dynamic_img_size(height, width):
    """A ViT built with ``dynamic_img_size`` takes any size; the embed level's grid then comes from
    the image (rows from its height, columns from its width), not from the square level spec."""
    t = create_teacher("timm", model_name=REG4, pretrained=False, image_size=56,
                       model_args={**TINY, "dynamic_img_size": True}, levels=["embed", "block2"])
    p = t.patch_size
    rows, cols = height // p, width // p
    row, col = rows - 2, cols - 1
    x = torch.rand(1, 3, height, width)
    y = x.clone()
    y[..., row * p:(row + 1) * p, col * p:(col + 1) * p] = torch.rand(3, p, p)
    with torch.no_grad():  # extract, not forward: the level specs are for square 56x56 images
        (ex, bx), (ey, _) = t.extract(x), t.extract(y)
    assert ex.shape == bx.shape == (1, rows, cols, 48)
    changed = (ex[0] - ey[0]).abs().amax(-1) > 1e-6
    expected = torch.zeros(rows, cols, dtype=torch.bool)
    expected[row, col] = True
    assert torch.equal(changed, expected)


def test_block_tokens_equal_a_manual_pass_without_prefix_tokens():
    t = tiny_vit()
    m = t.model
    x = torch.rand(2, 3, 112, 112)
    with torch.no_grad():
        h = m.norm_pre(m._pos_embed(m.patch_embed((x - torch.tensor(t.mean).view(1, 3, 1, 1))
                                                  / torch.tensor(t.std).view(1, 3, 1, 1))))
        manual = []
        for blk in m.blocks:
            h = blk(h)
            manual.append(rearrange(h[:, 5:], "b (h w) d -> b h w d", h=8))
    assert h.shape[1] == 5 + 64
    for a, b in zip(t(x), manual):
        torch.testing.assert_close(a, b)


def test_a_cnn_gives_heterogeneous_levels():
    t = create_teacher("timm", model_name="resnet18", pretrained=False, image_size=64)
    assert [(l.name, l.grid[0], l.dim) for l in t.levels] == [
        ("act1", 32, 64), ("layer1", 16, 64), ("layer2", 8, 128), ("layer3", 4, 256), ("layer4", 2, 512)]
    assert t.patch_size == 16
    assert [tuple(f.shape[1:3]) for f in t(torch.rand(1, 3, 64, 64))] == [(g, g) for g in (32, 16, 8, 4, 2)]


def test_bad_settings_raise_config_errors():
    with pytest.raises(ConfigError, match="not a timm model"):
        create_teacher("timm", model_name="vit_nonexistent_patch99", pretrained=False)
    with pytest.raises(ConfigError, match="image_size"):
        tiny_vit(image_size=100)
    with pytest.raises(ConfigError, match="levels"):
        tiny_vit(levels=["block7"])
    with pytest.raises(ConfigError, match="model_args"):
        create_teacher("timm", model_name=REG4, pretrained=False, image_size=112,
                       model_args={"no_such_arg": 1})
