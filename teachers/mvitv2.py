"""MViTv2 video transformer (torchvision, Kinetics-400) fed a "boring video": one still image
repeated along time.

The clip (B, 3, T, H, W) goes through the patch embedding (stride 2 in time, 4 in space) and the
multiscale blocks; each block returns (tokens, (T', h, w)) with a class token first. A level's
features are that block's tokens without the class token, reshaped to (T', h, w, d), of which one
frame is kept (default the middle one, away from the zero padding at the clip's ends) or the mean
over time. For ``mvit_v2_s`` at 224x224 and T=16: T'=8, and 16 blocks on grids 56, 28 (x2),
14 (x11), 7 (x2) with widths 96, 192 (x2), 384 (x11), 768 (x2); the patch embedding is level
``embed`` (index 0, 56x56x96), the blocks ``block1`` .. ``block16``.

The default ``patch_size`` of 16 (the student's column filter) puts the column on the grid of the
stride-16 stage that holds 11 of the 16 blocks (14x14 at 224, a 196-value trigger column); the
stride-4 grid would make a 3136-value column for little gain.
"""

from __future__ import annotations

from typing import Sequence

import torch
from einops import rearrange, reduce, repeat
from torch import nn

from teachers.base import (Level, Teacher, check_image_size, normalize, seeded, select_levels,
                           weights_unavailable)
from teachers.errors import ConfigError
from teachers.registry import register_teacher

# What the Kinetics-400 weights of torchvision's mvit_v2_s were trained with (its transforms()).
KINETICS_MVIT_MEAN = (0.45, 0.45, 0.45)
KINETICS_MVIT_STD = (0.225, 0.225, 0.225)
TIME_REDUCE = ("frame", "mean")


def _conv_out(n: int, kernel: int, stride: int, padding: int) -> int:
    return (n + 2 * padding - kernel) // stride + 1


def _conv3d_out(thw: Sequence[int], conv: nn.Module) -> tuple[int, int, int]:
    k, s, p = conv.kernel_size, conv.stride, conv.padding
    return tuple(_conv_out(n, k[i], s[i], p[i]) for i, n in enumerate(thw))


class MViTv2Teacher(Teacher):
    """A frozen MViT (torchvision) whose per-block outputs on a repeated still image are the levels.

    Args:
        model: A torchvision ``MViT`` with relative position embeddings (MViTv2). Built by the
            factories ``mvitv2_s`` and ``mvitv2_tiny``.
        image_size: Input side in pixels; a multiple of ``patch_size``.
        frames: Clip length T: the image is repeated this many times along time.
        time_reduce: ``"frame"`` keeps one output frame, ``"mean"`` averages the T' frames.
        frame: Output frame kept when ``time_reduce="frame"`` (negative counts from the end);
            default the middle one, T' // 2.
        levels: Levels by index (0 = ``embed``, i = ``block{i}``) or name; default every block.
        patch_size: Default patch of the student's column filter (see the module docstring).
        mean: Per-channel normalization mean of the clip.
        std: Per-channel normalization std of the clip.
        name: Name recorded in ``describe()``.
    """

    def __init__(self, model: nn.Module, image_size: int = 224, frames: int = 16,
                 time_reduce: str = "frame", frame: int | None = None,
                 levels: Sequence[int | str] | None = None, patch_size: int = 16,
                 mean: Sequence[float] = KINETICS_MVIT_MEAN, std: Sequence[float] = KINETICS_MVIT_STD,
                 name: str = "mvit"):
        super().__init__()
        if getattr(model.blocks[0].attn, "rel_pos_h", None) is None:
            raise ConfigError(
                "The MViT teacher needs MViTv2's relative position embeddings (rel_pos_embed=True); "
                "absolute position embeddings (MViTv1) fix the input size and are not supported."
            )
        if time_reduce not in TIME_REDUCE:
            raise ConfigError(
                f"Setting 'model.teacher_args.time_reduce': {time_reduce!r} is not one of "
                f"{', '.join(TIME_REDUCE)}; 'frame' keeps one output frame, 'mean' averages them."
            )
        if frames < 1:
            raise ConfigError(f"Setting 'model.teacher_args.frames': {frames} must be at least 1.")
        check_image_size(image_size, patch_size, "the MViT teacher's patch size")
        self.model, self.name = model, name
        self.image_size, self.patch_size, self.frames = image_size, patch_size, frames
        self.time_reduce, self.mean, self.std = time_reduce, tuple(mean), tuple(std)

        # Token grids (T', h, w) after the patch embedding and after each block's query pooling.
        thw = _conv3d_out((frames, image_size, image_size), model.conv_proj)
        shapes = [(thw, model.conv_proj.out_channels)]
        for block in model.blocks:
            if block.attn.pool_q is not None:
                thw = _conv3d_out(thw, block.attn.pool_q.pool)
            shapes.append((thw, [m for m in block.mlp.modules() if isinstance(m, nn.Linear)][-1].out_features))
        names = ["embed"] + [f"block{i}" for i in range(1, len(model.blocks) + 1)]
        self.level_index = select_levels(names, levels, "model.teacher_args.levels",
                                         default=range(1, len(names)))
        self._levels = [Level(names[i], tuple(shapes[i][0][1:]), shapes[i][1]) for i in self.level_index]
        self.out_frames = t_out = shapes[0][0][0]  # blocks pool space only, never time
        self.frame = t_out // 2 if frame is None else frame
        if time_reduce == "frame" and not -t_out <= self.frame < t_out:
            raise ConfigError(
                f"Setting 'model.teacher_args.frame': {frame} is out of range; a clip of {frames} "
                f"frames gives {t_out} output frames, indices 0..{t_out - 1} (or negative from the end)."
            )
        self.freeze()

    @property
    def levels(self) -> list[Level]:
        return self._levels

    def clip(self, images: torch.Tensor) -> torch.Tensor:
        """The boring video (B, 3, T, H, W): normalized images repeated T times."""
        return repeat(normalize(images, self.mean, self.std), "b c h w -> b c t h w", t=self.frames)

    def _reduce(self, tokens: torch.Tensor, thw: Sequence[int]) -> torch.Tensor:
        t, h, w = thw
        x = rearrange(tokens[:, 1:], "b (t h w) d -> b t h w d", t=t, h=h, w=w)
        if self.time_reduce == "mean":
            return reduce(x, "b t h w d -> b h w d", "mean")
        return x[:, self.frame]

    def extract(self, images: torch.Tensor) -> list[torch.Tensor]:
        m = self.model
        x = m.conv_proj(self.clip(images))
        thw = tuple(x.shape[2:])
        x = m.pos_encoding(rearrange(x, "b d t h w -> b (t h w) d"))  # prepends the class token
        out = {0: self._reduce(x, thw)} if 0 in self.level_index else {}
        last = max(self.level_index)
        for i, block in enumerate(m.blocks[:last], start=1):
            x, thw = block(x, thw)
            if i in self.level_index:
                out[i] = self._reduce(x, thw)
        return [out[i] for i in self.level_index]

    def describe(self) -> dict:
        return {**super().describe(), "model_name": self.name, "frames": self.frames,
                "time_reduce": self.time_reduce, "frame": self.frame, "mean": list(self.mean),
                "std": list(self.std)}


@register_teacher
def mvitv2_s(pretrained: bool = True, image_size: int = 224, seed: int = 0, **kwargs) -> MViTv2Teacher:
    """torchvision's ``mvit_v2_s``: Kinetics-400 weights, or random weights with ``pretrained=False``.

    Other arguments go to ``MViTv2Teacher`` (frames, time_reduce, frame, levels, patch_size, ...).
    The weights were trained on 16x224x224 clips; other sizes work (the relative position tables
    are interpolated) but move away from what the network saw.
    """
    from torchvision.models.video import MViT_V2_S_Weights, mvit_v2_s as build

    if pretrained:
        weights = MViT_V2_S_Weights.KINETICS400_V1
        try:
            model = build(weights=weights)
        except (OSError, RuntimeError, ValueError) as e:
            raise weights_unavailable(
                "the Kinetics-400 weights of mvit_v2_s", e,
                "$TORCH_HOME/hub/checkpoints, default ~/.cache/torch",
                [f"copy {weights.url.rsplit('/', 1)[-1]} into that folder"]) from None
    else:
        with seeded(seed):
            model = build(weights=None)
    return MViTv2Teacher(model, image_size=image_size, name="mvit_v2_s", **kwargs)


@register_teacher
def mvitv2_tiny(pretrained: bool = False, image_size: int = 224, frames: int = 4, seed: int = 0,
                **kwargs) -> MViTv2Teacher:
    """A tiny random MViTv2 for tests and smoke runs (never pretrained): 5 blocks on grids of stride
    4, 8, 16, 16, 32 (56, 28, 14, 14, 7 at 224) with widths 16, 32, 64, 64, 128; 4 frames."""
    from torchvision.models.video.mvit import MSBlockConfig, MViT

    if pretrained:
        raise ConfigError("Teacher 'mvitv2_tiny' has no released weights; set 'pretrained: false'.")
    # (heads, in, out, stride_q, stride_kv): the stage pattern of mvit_v2_s, much narrower and shallower.
    spec = [(1, 16, 16, 1, 8), (2, 16, 32, 2, 4), (2, 32, 64, 2, 2), (2, 64, 64, 1, 2),
            (4, 64, 128, 2, 1)]
    blocks = [MSBlockConfig(num_heads=h, input_channels=i, output_channels=o, kernel_q=[3, 3, 3],
                            kernel_kv=[3, 3, 3], stride_q=[1, sq, sq], stride_kv=[1, skv, skv])
              for h, i, o, sq, skv in spec]
    with seeded(seed):
        model = MViT(spatial_size=(image_size, image_size), temporal_size=frames, block_setting=blocks,
                     residual_pool=True, residual_with_cls_embed=False, rel_pos_embed=True,
                     proj_after_attn=True, num_classes=1)
    return MViTv2Teacher(model, image_size=image_size, frames=frames, name="mvitv2_tiny", **kwargs)
