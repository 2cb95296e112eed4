"""Fidelity of student features to teacher features, per image and level (docs/islands.md says
what each measure means and why R^2 is the one to trust on nearly constant deep levels)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange


def _flat(x: torch.Tensor) -> torch.Tensor:
    return rearrange(x.float(), "b ... d -> b (...) d")


def cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over locations of the cosine similarity of feature vectors; one value per image (B,)."""
    return F.cosine_similarity(_flat(pred), _flat(target), dim=-1).mean(dim=1)


def centered_cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cosine after subtracting each image's mean feature over locations (B,); a constant
    prediction cannot score high."""
    p, t = _flat(pred), _flat(target)
    return cosine(p - p.mean(1, keepdim=True), t - t.mean(1, keepdim=True))


def r2(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """R^2 = 1 - SSE / SST per image (B,), SST taken around the teacher's mean over that image's
    locations; a prediction constant over locations scores at most 0. A level with one location
    (a global embedding) has no spread over locations: its SST is taken around zero, so the score
    is 1 - the relative squared error."""
    p, t = _flat(pred), _flat(target)
    sse = (p - t).pow(2).sum(dim=(1, 2))
    centre = t.mean(dim=1, keepdim=True) if t.shape[1] > 1 else torch.zeros_like(t)
    sst = (t - centre).pow(2).sum(dim=(1, 2))
    return 1 - sse / sst.clamp_min(eps)


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image (B,)."""
    return (_flat(pred) - _flat(target)).pow(2).mean(dim=(1, 2))
