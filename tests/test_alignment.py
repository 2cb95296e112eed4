"""Token alignment: a level's token (i, j) belongs to the patch in row i, column j.

The official APM dump keeps the first N-5 tokens of [CLS, 4 registers, patches], so its tokens sit
five places off and the last five patches are lost; perturbing one patch shows ours are in place.
"""

import pytest
import torch

from teachers import create_teacher


@pytest.mark.parametrize("registers", [0, 4])
def test_perturbing_one_patch_changes_only_its_embedding_token(registers):
    t = create_teacher("dinov2_tiny", image_size=112, registers=registers, levels=["embed", -1])
    assert [l.name for l in t.levels] == ["embed", "block3"]
    x = torch.rand(1, 3, 112, 112)
    row, col, p = 3, 5, t.patch_size
    y = x.clone()
    y[..., row * p:(row + 1) * p, col * p:(col + 1) * p] = torch.rand(3, p, p)
    ex, ey = t(x)[0][0], t(y)[0][0]  # embedding level, (8, 8, d)
    changed = (ex - ey).abs().amax(-1) > 1e-6
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[row, col] = True
    assert torch.equal(changed, expected)
    # deeper levels mix tokens through attention, so the perturbation spreads there
    assert ((t(x)[1] - t(y)[1]).abs().amax(-1) > 1e-6).sum() > 1


def test_all_patches_are_kept_and_prefix_tokens_are_dropped():
    t = create_teacher("dinov2_tiny", image_size=56, registers=4)
    out = t.model(pixel_values=torch.rand(2, 3, 56, 56), output_hidden_states=True)
    assert out.hidden_states[-1].shape[1] == 1 + 4 + 16  # CLS, 4 registers, 4x4 patches
    f = t(torch.rand(2, 3, 56, 56))
    assert all(tuple(l.shape) == (2, 4, 4, 32) for l in f)


@pytest.mark.parametrize("height, width", [(56, 84), (84, 56)])
def test_non_square_images_take_rows_from_height_and_columns_from_width(height, width):
    """Rows from the image's height, columns from its width: a grid read from one side alone
    misshapes a non-square image (or transposes it), and the changed token moves."""
    t = create_teacher("dinov2_tiny", image_size=56, levels=["embed"])
    p = t.patch_size
    rows, cols = height // p, width // p
    row, col = rows - 2, cols - 1
    x = torch.rand(2, 3, height, width)
    y = x.clone()
    y[1, :, row * p:(row + 1) * p, col * p:(col + 1) * p] = torch.rand(3, p, p)
    with torch.no_grad():  # extract, not forward: the level specs are for square 56x56 images
        ex, ey = t.extract(x)[0], t.extract(y)[0]
    assert ex.shape == (2, rows, cols, 32)
    changed = (ex - ey).abs().amax(-1) > 1e-6
    expected = torch.zeros(2, rows, cols, dtype=torch.bool)
    expected[1, row, col] = True
    assert torch.equal(changed, expected)
