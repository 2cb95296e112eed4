"""Any timm model with ``forward_intermediates`` as a teacher, by name (``teacher: timm``,
``teacher_args: {model_name: vit_small_patch14_reg4_dinov2.lvd142m}``).

``forward_intermediates`` returns one feature map per block (per stage for CNNs) with the prefix
tokens (CLS, registers, distillation) already removed. Levels are those maps, named ``block1`` ..
``blockN`` for ViTs (``blocks.i``), else after timm's module names. ViT-like models (a
``norm_pre`` and ``num_prefix_tokens``) also offer ``embed`` (index 0): the patch embedding plus
position, prefix tokens dropped here. Grids come from each level's reduction (the patch size for a
ViT) and widths from ``feature_info``; the input is normalized with the model's own mean and std.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import torch
from einops import rearrange

from teachers.base import (IMAGENET_MEAN, IMAGENET_STD, Level, Teacher, check_image_size, normalize,
                           seeded, select_levels, weights_unavailable)
from teachers.errors import ConfigError
from teachers.registry import register_teacher


def _level_name(module: str) -> str:
    m = re.fullmatch(r"blocks\.(\d+)", module)
    return f"block{int(m.group(1)) + 1}" if m else module.replace(".", "_")


class TimmTeacher(Teacher):
    """A frozen timm model whose ``forward_intermediates`` outputs are the levels.

    Args:
        model_name: A timm model name, with or without pretrained tag
            (``vit_small_patch14_dinov2.lvd142m``), or ``hf-hub:...``.
        image_size: Input side in pixels; a multiple of every selected level's reduction.
        pretrained: Load the released weights (needs network or the Hugging Face cache); False
            builds the same architecture with random weights, seeded by ``seed``.
        levels: Levels by index or name; for ViTs 0 = ``embed``, i = ``block{i}``. Default every
            block (every feature map for models without ``embed``).
        model_args: Extra keyword arguments of ``timm.create_model`` (e.g. ``depth``,
            ``embed_dim``, ``num_heads`` for a small random model). ``img_size`` defaults to
            ``image_size`` for models that take it.
        norm: Apply the model's final norm to every block output (timm's ``norm=True``).
        patch_size: Default patch of the student's column filter; default the model's patch
            size, or 16 for models without a patch embedding.
        seed: Seed of the random weights when ``pretrained=False``.
    """

    def __init__(self, model_name: str, image_size: int = 224, pretrained: bool = True,
                 levels: Sequence[int | str] | None = None, model_args: dict[str, Any] | None = None,
                 norm: bool = False, patch_size: int | None = None, seed: int = 0):
        super().__init__()
        self.model_name, self.image_size, self.norm = model_name, image_size, norm
        self.model = self._load(model_name, image_size, pretrained, dict(model_args or {}), seed)
        m = self.model
        if not hasattr(m, "forward_intermediates"):
            raise ConfigError(
                f"Setting 'model.teacher_args.model_name': timm model {model_name!r} has no "
                f"forward_intermediates, so its per-layer features cannot be read; pick another "
                f"model (most timm ViTs and CNNs have it)."
            )
        info = list(m.feature_info)
        self.has_embed = hasattr(m, "norm_pre") and hasattr(m, "num_prefix_tokens")
        self.num_prefix = int(getattr(m, "num_prefix_tokens", 0))
        names = (["embed"] if self.has_embed else []) + [_level_name(f["module"]) for f in info]
        specs = ([(self._patch(), m.embed_dim)] if self.has_embed else []) + \
                [(f["reduction"], f["num_chs"]) for f in info]
        blocks_from = 1 if self.has_embed else 0
        self.level_index = select_levels(names, levels, "model.teacher_args.levels",
                                         default=range(blocks_from, len(names)))
        for i in self.level_index:
            check_image_size(image_size, specs[i][0],
                             f"the reduction of level {names[i]!r} of {model_name!r},")
        self._levels = [Level(names[i], (image_size // specs[i][0],) * 2, specs[i][1])
                        for i in self.level_index]
        self.block_index = [i - blocks_from for i in self.level_index if i >= blocks_from]
        self.patch_size = patch_size or self._patch() or 16
        cfg = getattr(m, "pretrained_cfg", None) or {}
        self.mean = tuple(cfg.get("mean", IMAGENET_MEAN))
        self.std = tuple(cfg.get("std", IMAGENET_STD))
        self._embed: torch.Tensor | None = None
        if self.has_embed and 0 in self.level_index:
            m.norm_pre.register_forward_hook(self._keep_embed)
        self.freeze()

    def _patch(self) -> int | None:
        pe = getattr(self.model, "patch_embed", None)
        p = getattr(pe, "patch_size", None)
        return None if p is None else int(p[0] if isinstance(p, (tuple, list)) else p)

    def _keep_embed(self, module, args, output) -> None:
        self._embed = output

    @staticmethod
    def _load(model_name: str, image_size: int, pretrained: bool, args: dict, seed: int):
        import timm

        if ":" not in model_name and not timm.is_model(model_name):
            close = timm.list_models(f"*{model_name.split('.')[0][:12]}*")[:8]
            raise ConfigError(
                f"Setting 'model.teacher_args.model_name': {model_name!r} is not a timm model."
                + (f" Similar names: {', '.join(close)}." if close else "")
                + " List them with python -c \"import timm; print(timm.list_models('*vit*'))\"."
            )

        def create(**kw):
            try:
                return timm.create_model(model_name, pretrained=pretrained, **kw, **args)
            except TypeError as e:
                if "img_size" in str(e) and "img_size" in kw:  # CNNs take no img_size
                    return timm.create_model(model_name, pretrained=pretrained, **args)
                raise ConfigError(f"Setting 'model.teacher_args.model_args': {e}") from None

        kw = {} if "img_size" in args else {"img_size": image_size}
        if not pretrained:
            with seeded(seed):
                return create(**kw)
        try:
            return create(**kw)
        except (OSError, RuntimeError, ValueError) as e:
            raise weights_unavailable(
                f"the pretrained timm weights of {model_name!r}", e, "~/.cache/huggingface",
                ["set HF_HOME to a cache that has them"]) from None

    @property
    def levels(self) -> list[Level]:
        return self._levels

    def extract(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = normalize(images, self.mean, self.std)
        wanted = sorted(self.block_index)
        self._embed = None
        maps = self.model.forward_intermediates(
            x, indices=wanted or [0], norm=self.norm, stop_early=True, output_fmt="NCHW",
            intermediates_only=True)
        offset = 1 if self.has_embed else 0
        out = {i + offset: rearrange(f, "b d h w -> b h w d") for i, f in zip(wanted, maps)}
        if self._embed is not None:
            h, w = self.model.patch_embed.dynamic_feat_size(tuple(images.shape[-2:]))
            out[0] = rearrange(self._embed[:, self.num_prefix:], "b (h w) d -> b h w d", h=h, w=w)
            self._embed = None
        return [out[i] for i in self.level_index]

    def describe(self) -> dict:
        return {**super().describe(), "model_name": self.model_name, "prefix_tokens": self.num_prefix,
                "norm": self.norm}


@register_teacher(name="timm")
def timm_teacher(model_name: str = "vit_small_patch14_dinov2.lvd142m", pretrained: bool = True,
                 **kwargs) -> TimmTeacher:
    """Any timm model with ``forward_intermediates``, by ``model_name``; see ``TimmTeacher``."""
    return TimmTeacher(model_name=model_name, pretrained=pretrained, **kwargs)
