"""What the student is distilled toward: per level, the frozen teacher's features (read from the
teacher-feature cache where it holds them), then the patch-mean colour of the ``rgb`` level."""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

from teachers.base import Teacher
from teachers.multi import TeacherSet


class TeacherTargets:
    """Targets on the teacher's scale, (B, h, w, d) per level.

    Args:
        teacher: The frozen teacher (or TeacherSet).
        rgb: Add the ``rgb`` level: each ``patch_size`` patch's mean colour.
        patch_size: The student's patch, over which colours are averaged.
    """

    def __init__(self, teacher: Teacher, rgb: bool, patch_size: int):
        self.teacher, self.rgb, self.patch_size = teacher, rgb, patch_size
        self.cache = None  # an apm.cache.FeatureCache(Set), once opened

    def __call__(self, images: torch.Tensor, index: torch.Tensor | None = None) -> list[torch.Tensor]:
        """With the cache open and the images' dataset ``index`` given, cached features are read
        and only uncached images go through the teacher."""
        if self.cache is not None and index is not None:
            feats = self._cached(images, index)
        else:
            feats = self.teacher_features(images)
        if self.rgb:
            feats.append(rearrange(F.avg_pool2d(images.float(), self.patch_size), "b c h w -> b h w c"))
        return feats

    def teacher_features(self, images: torch.Tensor, member: int | None = None) -> list[torch.Tensor]:
        """The teacher's levels, or only those of member ``member`` of a TeacherSet."""
        if next(self.teacher.parameters(), images).device != images.device:
            self.teacher.to(images.device)
        t = self.teacher
        feats = t(images) if member is None else t.member_features(member, images)
        return [f.float() for f in feats]

    def _cached(self, images: torch.Tensor, index: torch.Tensor) -> list[torch.Tensor]:
        if isinstance(self.teacher, TeacherSet):  # each member on its own cache and misses
            return [f for i, part in enumerate(self.cache.parts)
                    for f in self._cached_part(part, images, index, i)]
        return self._cached_part(self.cache, images, index)

    def _cached_part(self, cache, images: torch.Tensor, index: torch.Tensor,
                     member: int | None = None) -> list[torch.Tensor]:
        hit = cache.has(index)
        if bool(hit.all()):
            return [f.to(images.device, non_blocking=True) for f in cache.read(index)]
        miss = (~hit).nonzero().squeeze(1)
        new = self.teacher_features(images[miss.to(images.device)], member)
        cache.write(index[miss], new)
        if not bool(hit.any()):
            return new
        feats = [f.to(images.device) for f in cache.read(index)]
        return [f.index_copy(0, miss.to(f.device), n) for f, n in zip(feats, new)]  # exact, not fp16

    def open_cache(self, folder: str, name: str | None, args: dict[str, Any] | None,
                   sources: Sequence[str], strategy=None) -> None:
        """Open (or create) the cache in ``folder`` for these training images, in order, for the
        teacher registered as ``name`` with ``args``. Under a distributed ``strategy`` rank 0
        creates it (every shard file included) before the others open it."""
        from apm.cache import FeatureCache, FeatureCacheSet, teacher_identity

        t = self.teacher
        if isinstance(t, TeacherSet):  # a sub-folder per member, each with its own identity
            members = [(s.alias, teacher_identity(s.name, s.args, m, t.image_size), m.levels)
                       for s, m in zip(t.specs, t.members)]
            open_cache = partial(FeatureCacheSet.open, folder, members, sources)
        else:
            open_cache = partial(FeatureCache.open, folder, teacher_identity(name, args, t), t.levels, sources)
        if strategy is None or strategy.is_global_zero:
            open_cache()
        if strategy is not None:
            strategy.barrier("feature_cache")
        self.cache = open_cache(verbose=False)
