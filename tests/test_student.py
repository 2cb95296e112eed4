"""The student: shapes, query independence, and its pieces."""

import torch

from apm.codes import grid_coords, sincos_2d
from apm.student import APMStudent
from teachers import Level

LEVELS = [Level("a", (8, 8), 12), Level("b", (4, 4), 20), Level("rgb", (8, 8), 3)]


def make_student(**kw) -> APMStudent:
    torch.manual_seed(0)
    return APMStudent(LEVELS, image_size=64, patch_size=8, pe_dim=32, level_dim=8,
                      hidden_dims=kw.pop("hidden_dims", [48, 48]), **kw)


def test_shapes_per_level():
    s = make_student()
    x = torch.rand(2, 3, 64, 64)
    dense = s.dense(x)
    assert [tuple(d.shape) for d in dense] == [(2, 8, 8, 12), (2, 4, 4, 20), (2, 8, 8, 3)]
    assert s.trigger(x).shape == (2, 64)  # one filter: the trigger column has h*w values


def test_a_query_does_not_depend_on_the_other_queries_in_its_batch():
    s = make_student()
    x = torch.rand(3, 3, 64, 64)
    full = s(x, [None, None, None])
    # The same locations asked alone, in another order, mixed with other levels' queries.
    loc = torch.tensor([[5, 0, 63], [1, 2, 3], [7, 7, 7]])
    part = s(x, [loc, torch.tensor([[0], [15], [3]]), torch.zeros(3, 0, dtype=torch.long)])
    for b in range(3):
        torch.testing.assert_close(part[0][b], full[0][b, loc[b]])
    torch.testing.assert_close(part[1][:, 0], full[1][torch.arange(3), torch.tensor([0, 15, 3])])
    # One image's predictions do not depend on the other images in the batch either.
    torch.testing.assert_close(s(x[1:2], [None] * 3)[0][0], full[0][1], rtol=1e-5, atol=1e-5)


def test_chunked_and_arbitrary_coordinates_match_dense():
    s = make_student()
    x = torch.rand(1, 3, 64, 64)
    dense = s.dense(x, [1])[0].reshape(1, 16, 20)
    coords = grid_coords((4, 4))
    torch.testing.assert_close(s.query(x, 1, coords, chunk=3), dense)
    # a permutation of the queries permutes the answers
    perm = torch.randperm(16)
    torch.testing.assert_close(s.query(x, 1, coords[perm], chunk=5), dense[:, perm])


def test_factorized_first_layer_equals_concatenated_query():
    s = make_student()
    x = torch.rand(2, 3, 64, 64)
    coords = s.coords(0)
    plain = s.decode(0, s.first(s.query_vectors(s.trigger(x), 0, coords)))
    torch.testing.assert_close(s.query(x, 0, coords), plain, rtol=1e-5, atol=1e-5)


def test_positional_code_is_continuous_and_distinct():
    c = grid_coords((16, 16))
    pe = sincos_2d(c, 64)
    assert pe.shape == (256, 64)
    d = torch.cdist(pe, pe) + torch.eye(256) * 1e3
    assert d.min() > 0.1  # every cell gets its own code
    # nearby continuous coordinates get nearby codes
    near = sincos_2d(c[:1] + 1e-4, 64)
    assert (near - pe[:1]).abs().max() < 0.05


def test_coarse_and_fine_levels_share_one_field():
    """A coarse cell centre and the fine cell centres around it are queried with the same
    coordinates: the 4x4 grid's cell centres are points of the continuous [0, 1] square."""
    fine, coarse = grid_coords((8, 8)), grid_coords((4, 4))
    assert torch.allclose(coarse[0], fine[[0, 1, 8, 9]].mean(0))


def test_trigger_column_is_the_filter_bank_on_normalized_images():
    """The normalization folded into the filters equals filtering a normalized copy, for one filter
    (the paper's) and for several, whose columns are stacked filter by filter."""
    from torchvision.transforms.functional import normalize

    from teachers.base import IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(0)
    images = torch.rand(2, 3, 56, 56)
    for filters in (1, 3):
        s = APMStudent([Level("a", (4, 4), 8)], 56, 14, pe_dim=16, level_dim=4, hidden_dims=[32],
                       column_filters=filters)
        want = torch.nn.functional.conv2d(normalize(images, IMAGENET_MEAN, IMAGENET_STD), s.column.weight,
                                          s.column.bias, stride=14)  # (B, c, 4, 4)
        assert s.column_dim == filters * 16
        assert torch.allclose(s.trigger(images), want.flatten(1), atol=1e-5)
