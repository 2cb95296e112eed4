"""Exact t-SNE in torch, for the few thousand points of an island figure, on any device.

It follows scikit-learn's exact t-SNE step for step, so that the two embeddings mean the same:
conditional probabilities calibrated to the perplexity on squared Euclidean distances, symmetrized
joint P, a Student-t kernel with ``max(n_components - 1, 1)`` degrees of freedom, early
exaggeration 12 for the first 250 iterations at momentum 0.5, then momentum 0.8, and the
delta-bar-delta gains (+0.2 / x0.8, floor 0.01).

An iteration is memory-bound: it streams n x n matrices. It touches each of them as few times as
eager torch allows (about 10 passes of n^2 floats: the kernel comes out of one product with the
squared-distance expansion folded into it, and the row sums of the gradient ride along in the
second product); callers pass float32 (``apm.islands`` does), which halves the traffic again.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

EXAGGERATION = 12.0
EXPLORATION_ITERS = 250


@contextlib.contextmanager
def _exact_matmuls() -> Iterator[None]:
    """float32 products in full precision: TF32's 10-bit mantissa would wreck the distance
    expansion |a|^2 + |b|^2 - 2 a.b, whatever the caller set."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _sq_dists(x: torch.Tensor) -> torch.Tensor:
    sq = (x * x).sum(-1)
    return (sq[..., :, None] + sq[..., None, :] - 2 * x @ x.mT).clamp_min_(0)


def _zero_diagonal(a: torch.Tensor, value: float = 0.0) -> torch.Tensor:
    torch.diagonal(a, dim1=-2, dim2=-1).fill_(value)
    return a


def joint_probabilities(x: torch.Tensor, perplexity: float, tol: float = 1e-7,
                        max_iters: int = 100) -> torch.Tensor:
    """Symmetric joint probabilities P (..., n, n) of points x (..., n, d): per point, a Gaussian
    over the others whose entropy is log(perplexity) (bisection on its precision, in float64,
    until every point is within ``tol`` nats), then (P + P^T) / sum."""
    d = _sq_dists(x.double())
    d = d - _zero_diagonal(d.clone(), math.inf).amin(-1, keepdim=True)  # nearest other at 0
    d0 = _zero_diagonal(d.clone())  # for the entropy's sum over p_ij d_ij
    _zero_diagonal(d, math.inf)
    target = math.log(perplexity)
    shape = (*d.shape[:-1], 1)
    lo = torch.full(shape, -math.inf, dtype=d.dtype, device=d.device)
    hi = torch.full(shape, math.inf, dtype=d.dtype, device=d.device)
    beta = torch.ones(shape, dtype=d.dtype, device=d.device)
    for it in range(max_iters):  # all points at once
        e = torch.exp_(d * -beta)  # unnormalized p; the nearest other is exp(0) = 1
        total = e.sum(-1, keepdim=True)
        entropy = total.log() + beta * torch.linalg.vecdot(e, d0).unsqueeze(-1) / total
        done = (entropy - target).abs() <= tol  # such a point keeps its precision: a point's P
        if it % 8 == 7 and bool(done.all()):  # does not depend on the others in a batch
            break
        too_flat = entropy > target  # spread too wide: raise the precision
        lo = torch.where(too_flat, beta, lo)
        hi = torch.where(too_flat, hi, beta)
        step = torch.where(torch.isinf(hi), beta * 2, torch.where(torch.isinf(lo), beta / 2, (lo + hi) / 2))
        beta = torch.where(done, beta, step)
    p = e / total
    p = p + p.mT
    return (p / p.sum((-2, -1), keepdim=True)).clamp_min(1e-12).to(x.dtype)


def pca_init(x: torch.Tensor, n_components: int) -> torch.Tensor:
    """scikit-learn's ``init="pca"``: the first principal components of x (..., n, d), scaled so
    that the first has std 1e-4. The d x d covariance is decomposed on the CPU in float64 (small,
    and batched small decompositions are slow on a GPU)."""
    z = x - x.mean(-2, keepdim=True)
    _, vecs = torch.linalg.eigh((z.mT @ z).double().cpu())  # ascending eigenvalues
    top = vecs.flip(-1)[..., :n_components].to(z)
    y = z @ top
    big = y.gather(-2, y.abs().argmax(-2, keepdim=True))  # deterministic signs, as svd_flip
    y = y * torch.sign(big)
    return y / y[..., :1].std(-2, keepdim=True).clamp_min(1e-12) * 1e-4


def student_t_kernel(y: torch.Tensor, dof: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """w_ij = (1 + |y_i - y_j|^2 / dof)^(-(dof + 1) / 2) for points y (..., n, c), zero on the
    diagonal: one product of (n, c + 2) factors gives 1 + |y_i - y_j|^2 / dof directly. ``out``
    (..., n, n), if given, receives it."""
    sq = (y * y).sum(-1, keepdim=True) / dof
    one = torch.ones_like(sq)
    left = torch.cat([y * (-2 / dof), sq + 1, one], -1)
    right = torch.cat([y, one, sq], -1)
    # dof is a whole number: an integer power of rsqrt is far cheaper than a fractional pow
    w = torch.matmul(left, right.mT, out=out).clamp_min_(1).rsqrt_().pow_(int(dof) + 1)
    return _zero_diagonal(w)


def kl_gradient(y: torch.Tensor, p: torch.Tensor, dof: int,
                work: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """scikit-learn's exact-method gradient of KL(P || Q) with respect to the embedding
    y (..., n, c), Q the normalized Student-t kernel w: 2 (dof + 1) / dof * sum_j (p_ij - q_ij)
    w_ij (y_i - y_j). For dof 1 this is the KL's gradient; for more, scikit-learn weighs by w
    where the derivative has (1 + |y_i - y_j|^2 / dof)^-1, and so do we, to mean the same.

    ``work``: three (..., n, n) buffers (y's dtype twice, then float64) from ``workspace``,
    reused across calls: on a CPU a fresh n x n allocation costs more in page faults than the
    arithmetic."""
    w, pq, pq64 = work if work is not None else workspace(y)
    student_t_kernel(y, dof, out=w)
    torch.addcmul(p, w, -1 / w.sum((-2, -1), keepdim=True), out=pq).mul_(w)  # (p - w / Z) * w
    # sum_j pq_ij (y_i - y_j) as y_i * rowsum - (pq @ y)_i: the two terms nearly cancel where
    # the embedding is settled, so this product is in float64 (in float32, identical features
    # drift apart); as (y^T pq)^T, since pq is symmetric: about 2x faster on a CPU that way.
    y64 = y.to(pq64.dtype)
    both = (torch.cat([y64, torch.ones_like(y64[..., :1])], -1).mT @ pq64.copy_(pq)).mT
    return ((2 * (dof + 1) / dof) * (both[..., -1:] * y64 - both[..., :-1])).to(y.dtype)


def workspace(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The n x n buffers ``kl_gradient`` works in, for embeddings shaped like y (..., n, c)."""
    big = (*y.shape[:-1], y.shape[-2])
    return y.new_empty(big), y.new_empty(big), y.new_empty(big, dtype=torch.float64)


# An embedding whose points all lie within this distance of their mean (the kernel's unit is 1;
# a working one spreads over tens) has collapsed: the Student-t kernel sees a single point.
COLLAPSED_STD = 1e-3


def collapsed(y: torch.Tensor) -> torch.Tensor:
    """Whether each embedding y (..., n, c) collapsed (bool, shape ``y.shape[:-2]``)."""
    return (y - y.mean(-2, keepdim=True)).abs().amax((-2, -1)) < COLLAPSED_STD


def tsne(x: torch.Tensor, n_components: int = 3, perplexity: float = 30.0,
         learning_rate: float | None = None, max_iter: int = 1000) -> torch.Tensor:
    """Embed points x (n, d) into ``n_components`` by exact t-SNE on x's device; x (L, n, d)
    embeds L independent point sets at once (one set of kernel launches for all: the levels of
    an island figure).

    In float32 an embedding can collapse: scikit-learn's start (PCA scaled to std 1e-4) shrinks
    further during early exaggeration on some real features (DINOv2-S/14 block5 of ``astronaut``
    at 224 px) until float32 no longer resolves the points' distances, and it never unfolds (all
    points within 1e-5). Such a set is embedded again in float64, which unfolds as scikit-learn's
    does; ``collapsed`` tells the caller if even that failed.

    Args:
        x: Points (n, d) or (L, n, d); the perplexity search runs in float64, the iterations in
            float32, or float64 if x is.
        n_components: Output dimension.
        perplexity: Effective number of neighbours (capped at (n - 1) / 3).
        learning_rate: Step size; default scikit-learn's "auto", max(n / 12 / 4, 50).
        max_iter: Iterations, the first 250 with early exaggeration.

    Returns:
        The embedding (n, n_components) or (L, n, n_components) on x's device.
    """
    n = x.shape[-2]
    args = (n_components, min(perplexity, (n - 1) / 3),
            learning_rate if learning_rate is not None else max(n / EXAGGERATION / 4, 50.0), max_iter)
    x = x if x.dtype == torch.float64 else x.float()
    y = _embed(x, *args)
    bad = collapsed(y)
    if x.dtype != torch.float64 and bool(bad.any()):
        if y.dim() == 2:
            return _embed(x.double(), *args).to(y.dtype)
        y[bad] = _embed(x[bad].double(), *args).to(y.dtype)
    return y


def _embed(x: torch.Tensor, n_components: int, perplexity: float, lr: float, max_iter: int) -> torch.Tensor:
    """The t-SNE iterations of ``tsne`` in x's dtype."""
    dof = max(n_components - 1, 1)
    with _exact_matmuls():
        p = joint_probabilities(x, perplexity)
        y = pca_init(x, n_components)
        work = workspace(y)
        for it in range(max(max_iter, EXPLORATION_ITERS)):
            if it in (0, EXPLORATION_ITERS):  # sklearn restarts its optimizer state for the second stage
                update, gains = torch.zeros_like(y), torch.ones_like(y)
                exaggeration, momentum = (EXAGGERATION, 0.5) if it == 0 else (1.0, 0.8)
                target = p * exaggeration
            grad = kl_gradient(y, target, dof, work)
            gains = torch.where(update * grad >= 0, gains * 0.8, gains + 0.2).clamp_min(0.01)
            update = momentum * update - lr * gains * grad
            y = y + update
    return y
