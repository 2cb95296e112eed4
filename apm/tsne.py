"""Exact t-SNE in torch, for the few thousand points of an island figure, on any device.

It follows scikit-learn's exact t-SNE step for step, so that the two embeddings mean the same:
conditional probabilities calibrated to the perplexity on squared Euclidean distances, symmetrized
joint P, a Student-t kernel with ``max(n_components - 1, 1)`` degrees of freedom, early
exaggeration 12 for the first 250 iterations at momentum 0.5, then momentum 0.8, and the
delta-bar-delta gains (+0.2 / x0.8, floor 0.01). Every iteration is a handful of n x n products,
which is what a GPU does best: 2,048 points x 1,000 iterations take about a second there, where
scikit-learn's Barnes-Hut needs half a minute on a few CPU cores.
"""

from __future__ import annotations

import math

import torch

EXAGGERATION = 12.0
EXPLORATION_ITERS = 250


def _sq_dists(x: torch.Tensor) -> torch.Tensor:
    sq = (x * x).sum(-1)
    return (sq[..., :, None] + sq[..., None, :] - 2 * x @ x.mT).clamp_min_(0)


def _zero_diagonal(a: torch.Tensor, value: float = 0.0) -> torch.Tensor:
    torch.diagonal(a, dim1=-2, dim2=-1).fill_(value)
    return a


def joint_probabilities(x: torch.Tensor, perplexity: float, iters: int = 64) -> torch.Tensor:
    """Symmetric joint probabilities P (..., n, n) of points x (..., n, d): per point, a Gaussian
    over the others whose entropy is log(perplexity) (bisection on its precision), then
    (P + P^T) / sum."""
    d = _zero_diagonal(_sq_dists(x.double()), float("inf"))
    target = math.log(perplexity)
    shape = (*d.shape[:-1], 1)
    lo = torch.full(shape, -math.inf, dtype=d.dtype, device=d.device)
    hi = torch.full(shape, math.inf, dtype=d.dtype, device=d.device)
    beta = torch.ones(shape, dtype=d.dtype, device=d.device)
    for _ in range(iters):  # all points at once; 64 halvings/doublings reach double precision
        logits = -d * beta
        p = torch.softmax(logits, dim=-1)
        entropy = -(p * torch.log_softmax(logits, dim=-1).nan_to_num(neginf=0.0)).sum(-1, keepdim=True)
        too_flat = entropy > target  # spread too wide: raise the precision
        lo = torch.where(too_flat, beta, lo)
        hi = torch.where(too_flat, hi, beta)
        beta = torch.where(torch.isinf(hi), beta * 2, torch.where(torch.isinf(lo), beta / 2, (lo + hi) / 2))
    p = torch.softmax(-d * beta, dim=-1)
    p = p + p.mT
    return (p / p.sum((-2, -1), keepdim=True)).clamp_min(1e-12).to(x.dtype)


def pca_init(x: torch.Tensor, n_components: int) -> torch.Tensor:
    """scikit-learn's ``init="pca"``: the first principal components of x (..., n, d), scaled so
    that the first has std 1e-4."""
    z = x - x.mean(-2, keepdim=True)
    _, _, vh = torch.linalg.svd(z, full_matrices=False)
    y = z @ vh[..., :n_components, :].mT
    top = y.gather(-2, y.abs().argmax(-2, keepdim=True))  # deterministic signs, as svd_flip
    y = y * torch.sign(top)
    return y / y[..., :1].std(-2, keepdim=True).clamp_min(1e-12) * 1e-4


def tsne(x: torch.Tensor, n_components: int = 3, perplexity: float = 30.0,
         learning_rate: float | None = None, max_iter: int = 1000) -> torch.Tensor:
    """Embed points x (n, d) into ``n_components`` by exact t-SNE on x's device; x (L, n, d)
    embeds L independent point sets at once (one set of kernel launches for all: the levels of
    an island figure).

    Args:
        x: Points (n, d) or (L, n, d); computed in float32, or float64 if x is.
        n_components: Output dimension.
        perplexity: Effective number of neighbours (capped at (n - 1) / 3).
        learning_rate: Step size; default scikit-learn's "auto", max(n / 12 / 4, 50).
        max_iter: Iterations, the first 250 with early exaggeration.

    Returns:
        The embedding (n, n_components) or (L, n, n_components) on x's device.
    """
    x = x if x.dtype == torch.float64 else x.float()
    n = x.shape[-2]
    perplexity = min(perplexity, (n - 1) / 3)
    lr = learning_rate if learning_rate is not None else max(n / EXAGGERATION / 4, 50.0)
    dof = max(n_components - 1, 1)
    p = joint_probabilities(x, perplexity)
    y = pca_init(x, n_components)
    update, gains = torch.zeros_like(y), torch.ones_like(y)
    for it in range(max(max_iter, EXPLORATION_ITERS)):
        if it == EXPLORATION_ITERS:  # sklearn restarts its optimizer state for the second stage
            update, gains = torch.zeros_like(y), torch.ones_like(y)
        exaggeration, momentum = (EXAGGERATION, 0.5) if it < EXPLORATION_ITERS else (1.0, 0.8)
        w = _zero_diagonal((1 + _sq_dists(y) / dof).pow(-(dof + 1) / 2))  # Student-t kernel
        q = (w / w.sum((-2, -1), keepdim=True)).clamp_min(1e-12)
        pq = (exaggeration * p - q) * w
        grad = (2 * (dof + 1) / dof) * (pq.sum(-1, keepdim=True) * y - pq @ y)
        same_sign = update * grad >= 0
        gains = torch.where(same_sign, gains * 0.8, gains + 0.2).clamp_min(0.01)
        update = momentum * update - lr * gains * grad
        y = y + update
    return y
