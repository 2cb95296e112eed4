"""The project's ridge penalty and its solve, shared by the per-image head solve
(``apm.perceive.ridge_readout``) and the pooled one (``apm.field.HeadSolve``)."""

from __future__ import annotations

import torch


def ridge_solve(gram: torch.Tensor, rhs: torch.Tensor, ridge: float, n: int) -> torch.Tensor:
    """Solve (G + lam I) x = rhs for a Gram matrix G (..., m, m) of n centred rows (either h^T h
    or h h^T: the trace is the same), lam = ``ridge`` times the mean squared norm of those rows.
    The system is symmetric positive definite: Cholesky. (Batched LU, torch.linalg.solve, hits an
    MKL error loop on some CPUs after torch.set_num_threads.)"""
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    lam = (ridge * trace / n).clamp_min(1e-12)[..., None, None]
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return torch.cholesky_solve(rhs, torch.linalg.cholesky(gram + lam * eye))
