"""CLIP image towers through ``open_clip_torch``, and the text side for zero-shot classification.

Levels: ``embed`` (patch embedding + position after ``ln_pre``, the first block's input, index 0),
``block1`` .. ``blockN`` (the residual stream after each block) and ``global`` (index N + 1): the
projected image embedding on a 1x1 grid, exactly what ``model.encode_image`` returns (not
normalized), the one zero-shot classification compares with the class prompts. Class tokens are
removed; patch tokens are row-major. The default is every block and ``global``.

open_clip ships every model config and the BPE vocabulary in its wheel, so any architecture and the
tokenizer build offline; pretrained weights load where the user has them (a cache or a file).
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import pickle
from copy import deepcopy
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

from teachers.base import (Level, Teacher, check_image_size, normalize, seeded, select_levels,
                           weights_unavailable)
from teachers.errors import ConfigError, TeacherUnavailableError
from teachers.registry import register_teacher

if TYPE_CHECKING:
    import open_clip

SCHEMAS = ("hf-hub:", "local-dir:")
HF_CACHE = "~/.cache/huggingface or $HF_HOME"
# A tiny random CLIP for tests and smoke runs: a 3-block, 64-wide ViT with 16-pixel patches and a
# 2-block text tower over the real BPE vocabulary (49408 tokens, context 77), for offline zero-shot.
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"layers": 3, "width": 64, "head_width": 32, "mlp_ratio": 2.0, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2,
                 "mlp_ratio": 2.0},
}


def imagenet_templates() -> tuple[Callable[[str], str], ...]:
    """CLIP's 80 ImageNet prompt templates as open_clip ships them (callables: name -> prompt)."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return tuple(OPENAI_IMAGENET_TEMPLATES)


class CLIPTeacher(Teacher):
    """A frozen CLIP (open_clip) whose image-tower blocks and projected embedding are the levels.

    Args:
        model_name: An open_clip architecture (``ViT-B-16``, ``ViT-L-14``, ``ViT-H-14``, ...; see
            ``open_clip.list_models()``) or ``hf-hub:org/repo`` / ``local-dir:/folder``, which
            carry their own weights. Only open_clip's own ViT image towers are supported.
        weights: open_clip's pretrained tag (``openai``, ``laion2b_s32b_b79k``, ``dfn5b``, ...) or a
            checkpoint file. The tag also fixes the activation (QuickGELU for OpenAI weights) and
            the input mean and std, also for random weights.
        image_size: Input side in pixels; a multiple of the patch size. Other sizes than the
            weights' own interpolate the position embedding (open_clip's ``resize_pos_embed``).
        pretrained: Load ``weights`` (needs network or a cache); False builds the same
            architecture with random weights, seeded by ``seed``.
        levels: Levels by index (0 = ``embed``, i = ``block{i}``, N + 1 or -1 = ``global``) or
            name; default every block and ``global``.
        config_overrides: Keys of the open_clip model config to replace (``vision_cfg`` and
            ``text_cfg`` merged key by key), e.g. a small random model; with pretrained weights they
            must still match the checkpoint.
        cache_dir: Download folder of the weights; default open_clip's (the Hugging Face cache).
        seed: Seed of the random weights when ``pretrained=False``.
    """

    def __init__(self, model_name: str = "ViT-B-16", weights: str | None = "openai",
                 image_size: int = 224, pretrained: bool = True,
                 levels: Sequence[int | str] | None = None,
                 config_overrides: dict[str, Any] | None = None, cache_dir: str | None = None,
                 seed: int = 0):
        super().__init__()
        import open_clip

        self.model_name, self.weights, self.image_size = model_name, weights, image_size
        self.config_overrides = deepcopy(config_overrides or {})
        schema = model_name.startswith(SCHEMAS)
        tag = ({} if schema or not weights
               else open_clip.get_pretrained_cfg(_clean(model_name), weights))
        config = None if schema else _model_config(model_name, self.config_overrides)
        if config is not None:
            _check_vit(model_name, config)
            check_image_size(image_size, int(config["vision_cfg"].get("patch_size", 16)),
                             f"{model_name}'s patch size")
        if pretrained:
            _check_weights(model_name, weights, schema, tag)
        if self.config_overrides and config is None:
            raise ConfigError("Setting 'model.teacher_args.config_overrides' needs a built-in "
                              f"open_clip model_name, not {model_name!r}.")
        self.model = _build(model_name, weights, image_size, pretrained, config,
                            bool(self.config_overrides), tag, cache_dir, seed)
        v = self.model.visual
        if not isinstance(v, open_clip.transformer.VisionTransformer):
            raise _not_a_vit(model_name, type(v).__name__)
        self.patch_size = int(v.patch_size[0])
        check_image_size(image_size, self.patch_size, f"{model_name}'s patch size")
        pre = open_clip.get_model_preprocess_cfg(self.model)
        self.mean = tuple(tag.get("mean", pre.get("mean", open_clip.OPENAI_DATASET_MEAN)))
        self.std = tuple(tag.get("std", pre.get("std", open_clip.OPENAI_DATASET_STD)))

        depth, width = len(v.transformer.resblocks), v.transformer.width
        names = ["embed"] + [f"block{i}" for i in range(1, depth + 1)] + ["global"]
        self.level_index = select_levels(names, levels, "model.teacher_args.levels",
                                         default=range(1, depth + 2))
        self.global_index = depth + 1
        g = image_size // self.patch_size
        self._levels = [Level(names[i], (1, 1), v.output_dim) if i == self.global_index
                        else Level(names[i], (g, g), width) for i in self.level_index]
        self._embed: torch.Tensor | None = None
        if 0 in self.level_index:
            v.ln_pre.register_forward_hook(self._keep_embed)
        self._tokenizer = None
        self.freeze()

    def _keep_embed(self, module, args, output) -> None:
        self._embed = output

    @property
    def levels(self) -> list[Level]:
        return self._levels

    def extract(self, images: torch.Tensor) -> list[torch.Tensor]:
        v = self.model.visual
        h, w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        blocks = sorted(i - 1 for i in self.level_index if 0 < i < self.global_index)
        full = self.global_index in self.level_index  # the pooled embedding needs every block
        self._embed = None
        out = v.forward_intermediates(normalize(images, self.mean, self.std), indices=blocks or [0],
                                      stop_early=not full, intermediates_only=not full,
                                      output_fmt="NLC")  # NLC: class token already split off
        maps = {i + 1: f for i, f in zip(blocks, out["image_intermediates"])}
        if self._embed is not None:
            maps[0] = self._embed[:, 1:]  # [CLS, patches row-major]
            self._embed = None
        feats = {i: rearrange(f, "b (h w) d -> b h w d", h=h, w=w) for i, f in maps.items()}
        if full:
            feats[self.global_index] = rearrange(out["image_features"], "b d -> b 1 1 d")
        return [feats[i] for i in self.level_index]

    # -- the text side ---------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids (N, context_length) of ``texts`` by the model's own open_clip tokenizer."""
        if self._tokenizer is None:
            import open_clip

            self._tokenizer = open_clip.get_tokenizer(self.model_name,
                                                      context_length=self.model.context_length)
        return self._tokenizer(list(texts))

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalized text embeddings (N, D), float32, on the model's device."""
        device = next(self.model.parameters()).device
        with torch.autocast(device.type, enabled=False):
            return self.model.encode_text(self.tokenize(texts).to(device), normalize=True).float()

    def describe(self) -> dict:
        return {**super().describe(), "model_name": self.model_name, "weights": self.weights,
                "config_overrides": self.config_overrides, "prefix_tokens": 1}


def _clean(model_name: str) -> str:
    return model_name.replace("/", "-")  # open_clip accepts ViT-B/16 for ViT-B-16


def _model_config(model_name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The built-in open_clip config of ``model_name`` with ``overrides`` applied."""
    import open_clip

    config = open_clip.get_model_config(_clean(model_name))
    if config is None:
        close = difflib.get_close_matches(_clean(model_name), open_clip.list_models(), n=6,
                                          cutoff=0.5)
        raise ConfigError(
            f"Setting 'model.teacher_args.model_name': {model_name!r} is not an open_clip model."
            + (f" Similar names: {', '.join(close)}." if close else "")
            + " List them with python -c \"import open_clip; print(open_clip.list_models())\", or "
              "name a 'hf-hub:org/repo' or 'local-dir:/folder'."
        )
    for key, value in overrides.items():
        if key in ("vision_cfg", "text_cfg") and isinstance(value, dict):
            config[key] = {**config.get(key, {}), **value}
        else:
            config[key] = value
    return config


def _not_a_vit(model_name: str, tower: str) -> ConfigError:
    return ConfigError(
        f"Setting 'model.teacher_args.model_name': {model_name!r} has a {tower} image tower; this "
        f"teacher reads open_clip's own ViT towers (ViT-B-16, ViT-L-14, ViT-H-14, ...)"
        + ("; for a timm tower use teacher 'timm' with its timm name." if "timm" in tower else ".")
    )


def _check_vit(model_name: str, config: dict[str, Any]) -> None:
    """ConfigError, before building, for a config whose image tower is not open_clip's ViT."""
    vision = config["vision_cfg"]
    if vision.get("timm_model_name"):
        raise _not_a_vit(model_name, f"timm ({vision['timm_model_name']})")
    if isinstance(vision.get("layers"), (list, tuple)):
        raise _not_a_vit(model_name, "ResNet")


def _check_weights(model_name: str, weights: str | None, schema: bool, tag: dict) -> None:
    """ConfigError for pretrained weights named by neither a known tag nor an existing file."""
    import open_clip

    if schema or tag or (weights and os.path.isfile(weights)):
        return
    tags = open_clip.list_pretrained_tags_by_model(_clean(model_name))
    raise ConfigError(
        f"Setting 'model.teacher_args.weights': {weights!r} is neither a pretrained tag of "
        f"{model_name!r} nor an existing checkpoint file. "
        + (f"Its tags are {', '.join(tags)}." if tags else "open_clip has no tags for it.")
        + " Or set 'model.teacher_args.pretrained: false' for random weights."
    )


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """Drop the warnings and errors open_clip's factory logs on the root logger while building:
    that a random model was initialized randomly (what ``pretrained: false`` asked for), or why
    weights failed to load (the error raised here says it, in one paragraph)."""
    import open_clip.factory

    factory = open_clip.factory.__file__

    def keep(record: logging.LogRecord) -> bool:
        return record.pathname != factory

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _build(model_name: str, weights: str | None, image_size: int, pretrained: bool,
           config: dict | None, overrides: bool, tag: dict, cache_dir: str | None,
           seed: int) -> "open_clip.CLIP":
    """The open_clip model: random (seeded) or with ``weights``; ``config`` is the model config
    with the overrides (None for hf-hub: and local-dir: names)."""
    import open_clip

    kw: dict[str, Any] = dict(force_image_size=image_size, cache_dir=cache_dir,
                              force_quick_gelu=bool(tag.get("quick_gelu")))
    if overrides:  # the model config with the overrides replaces open_clip's, image size set here
        config = {k: v for k, v in deepcopy(config).items() if k != "custom_text"}
        config["vision_cfg"]["image_size"] = image_size
        config["quick_gelu"] = config.get("quick_gelu", False) or kw["force_quick_gelu"]
        kw.update(config)
    if not pretrained:
        with seeded(seed), _quiet_open_clip():
            try:
                return open_clip.create_model(model_name, pretrained=None, load_weights=False, **kw)
            except (TypeError, AssertionError) as e:
                raise ConfigError(f"Setting 'model.teacher_args.config_overrides': {e}") from None
    try:
        with _quiet_open_clip():
            return open_clip.create_model(model_name, pretrained=weights, require_pretrained=True,
                                          **kw)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as e:
        if "loading state_dict" in str(e) or (weights and os.path.isfile(weights)):
            raise TeacherUnavailableError(
                f"Could not load the CLIP weights {weights!r} into {model_name!r} "
                f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}). Set "
                f"'model.teacher_args.model_name' (and 'config_overrides') to the architecture the "
                f"weights were saved from, or set 'model.teacher_args.pretrained: false' to "
                f"distill a random-weight teacher of this architecture."
            ) from None
        raise weights_unavailable(
            f"the pretrained CLIP weights of {model_name!r}" if model_name.startswith(SCHEMAS)
            else f"the pretrained CLIP weights {weights!r} of {model_name!r}",
            e, cache_dir or HF_CACHE,
            ["set 'model.teacher_args.weights' to a checkpoint file you have",
             "set HF_HOME to a cache that has them"]) from None


@torch.no_grad()
def text_classifier(teacher: CLIPTeacher, class_names: Sequence[str],
                    templates: Sequence[str | Callable[[str], str]] | None = None) -> torch.Tensor:
    """Zero-shot weights (C, D): per class, the L2-normalized mean of the normalized text
    embeddings of every template filled with its name (CLIP's prompt ensembling). ``templates``
    are callables or strings with ``{}``; default CLIP's 80 ImageNet templates."""
    templates = imagenet_templates() if templates is None else tuple(templates)
    if not templates or not class_names:
        raise ConfigError("text_classifier needs at least one class name and one template.")
    bad = [t for t in templates if isinstance(t, str) and "{}" not in t]
    if bad:
        raise ConfigError(f"Prompt template {bad[0]!r} has no '{{}}' for the class name; write "
                          f"templates like 'a photo of a {{}}.'.")
    fill = [t.format if isinstance(t, str) else t for t in templates]
    rows = []
    for name in class_names:  # one class per batch: len(templates) prompts
        emb = teacher.encode_text([f(name) for f in fill])
        rows.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(rows)


def zero_shot_logits(image_embedding: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """CLIP's zero-shot logits (..., C): 100 x the cosine of image embeddings (..., D) (e.g. the
    ``global`` level, normalized here) with the rows of ``text_classifier``'s (C, D)."""
    return 100.0 * F.normalize(image_embedding.float(), dim=-1) @ classifier.float().T


@register_teacher
def clip_vit_b16(pretrained: bool = True, **kwargs) -> CLIPTeacher:
    """OpenAI CLIP ViT-B/16 (open_clip ViT-B-16, openai)."""
    return CLIPTeacher(**{"model_name": "ViT-B-16", "weights": "openai", **kwargs}, pretrained=pretrained)


@register_teacher
def clip_vit_l14(pretrained: bool = True, **kwargs) -> CLIPTeacher:
    """OpenAI CLIP ViT-L/14 (open_clip ViT-L-14, openai)."""
    return CLIPTeacher(**{"model_name": "ViT-L-14", "weights": "openai", **kwargs}, pretrained=pretrained)


@register_teacher
def clip_vit_h14(pretrained: bool = True, **kwargs) -> CLIPTeacher:
    """OpenCLIP ViT-H/14 trained on LAION-2B (open_clip ViT-H-14, laion2b_s32b_b79k)."""
    return CLIPTeacher(**{"model_name": "ViT-H-14", "weights": "laion2b_s32b_b79k", **kwargs},
                       pretrained=pretrained)


@register_teacher
def clip_vit_h14_dfn(pretrained: bool = True, **kwargs) -> CLIPTeacher:
    """DFN-5B CLIP ViT-H/14 (open_clip ViT-H-14, dfn5b)."""
    return CLIPTeacher(**{"model_name": "ViT-H-14", "weights": "dfn5b", **kwargs}, pretrained=pretrained)


@register_teacher(name="clip")
def clip_teacher(model_name: str = "ViT-B-16", weights: str | None = "openai",
                 pretrained: bool = True, **kwargs) -> CLIPTeacher:
    """Any open_clip ViT by ``model_name`` and ``weights`` (pretrained tag or file); see
    ``CLIPTeacher``."""
    return CLIPTeacher(model_name=model_name, weights=weights, pretrained=pretrained, **kwargs)


@register_teacher
def clip_tiny(pretrained: bool = False, config_overrides: dict | None = None,
              **kwargs) -> CLIPTeacher:
    """A tiny random CLIP (3-block 64-wide ViT, patch 16, embedding 32, 2-block text tower over the
    real tokenizer) for tests and smoke runs; never pretrained."""
    if pretrained:
        raise ConfigError("Teacher 'clip_tiny' has no released weights; set 'pretrained: false'.")
    return CLIPTeacher(model_name="ViT-B-16", weights=None, pretrained=False,
                       config_overrides={**TINY_CONFIG, **(config_overrides or {})}, **kwargs)
