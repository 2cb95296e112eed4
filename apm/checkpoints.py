"""Checkpoint IO: files that survive interruptions and load safely (the SIGTERM checkpoint is
``apm.callbacks.CheckpointOnStop``).

- :class:`AtomicCheckpointIO` writes a checkpoint to a temporary file in the same folder and moves
  it into place with ``os.replace``, so a process killed during a save leaves the previous file
  intact; it loads with ``weights_only=True`` (tensors and plain types only: no pickled code runs).
- :func:`check_compatible` refuses a checkpoint of another teacher or student shape with a
  ConfigError naming the settings that differ (``APMModule.from_checkpoint`` loads one for tools).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import uuid
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from apm.cache import json_normal, teacher_fingerprint
from apm.errors import APMError, ConfigError

# Settings that change what is computed but not what a checkpoint holds.
RUNTIME_ONLY = {"_instantiator", "_class_path", "compile", "feature_cache", "max_nonfinite_steps",
                "teacher_precision"}
# Settings that decide the teacher's features or the student's parameter shapes.
SHAPE_SETTINGS = {"teacher", "teacher_args", "teachers", "image_size", "patch_size", "hidden_dims",
                  "pe_dim", "level_dim", "rgb", "column_filters", "pixel_window", "pixel_spacing", "student",
                  "glom"}
# Settings that the data module owns (linked into the model by the CLI).
DATA_SETTINGS = {"image_size"}


def _is_local(path: Any) -> bool:
    return "://" not in str(path)


def read_checkpoint(path: str | Path, setting: str = "ckpt_path", map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint file with ``weights_only=True``; APMError naming ``setting`` when it is
    missing, truncated, or holds pickled objects beyond tensors and plain types."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"Setting {setting!r}: {str(path)!r} is not a file. Give the path of a .ckpt "
                          f"written by 'apm fit' (or 'last' to resume from the newest last.ckpt).")
    try:
        ckpt = torch.load(p, map_location=map_location or "cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise APMError(
            f"Setting {setting!r}: {p} holds Python objects beyond tensors and plain types, so it is "
            f"not loaded (loading it would run code stored in the file: {str(e).splitlines()[0][:160]}). "
            f"Checkpoints written by this project load safely; re-save this one from code you trust."
        ) from None
    except Exception as e:
        raise APMError(
            f"Setting {setting!r}: {p} is not a readable checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:160] if str(e) else ''}); it may be truncated or from another "
            f"program. Use another checkpoint, e.g. the last.ckpt or best-*.ckpt of the run."
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise APMError(f"Setting {setting!r}: {p} is not a Lightning checkpoint (no 'state_dict').")
    return ckpt


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO that writes atomically (temp file, fsync, ``os.replace``) on local disks
    and loads with ``weights_only=True`` unless told otherwise."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        if not _is_local(path) or storage_options is not None:
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Same folder (os.replace is atomic within a file system); mode 0o666 minus the umask, as
        # a plain open would give (mkstemp would make it private to the user).
        tmp = path.parent / f"{_temp_prefix(path)}{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        with contextlib.suppress(OSError):  # make the rename itself durable
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        _remove_stale_temps(path)

    def load_checkpoint(self, path: Any, map_location: Any = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is False or not _is_local(path):
            return super().load_checkpoint(path, weights_only=True if weights_only is None else weights_only)
        return read_checkpoint(path, "ckpt_path", map_location)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{socket.gethostname()}."


def _remove_stale_temps(path: Path) -> None:
    """Delete temporary files of ``path`` that writers on this host left when killed mid-save."""
    prefix = _temp_prefix(path)
    for tmp in path.parent.glob(f"{prefix}*.tmp"):
        pid = tmp.name[len(prefix):].split(".")[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)  # still running: not ours to delete
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                tmp.unlink()
        except OSError:
            pass


# -- compatibility -------------------------------------------------------------------------------
def _setting(name: str) -> str:
    return f"data.{name}" if name in DATA_SETTINGS else f"model.{name}"


def check_compatible(checkpoint: dict[str, Any], module: Any, path: str | Path | None = None,
                     setting: str = "ckpt_path") -> None:
    """ConfigError naming ``setting`` and the settings that differ when ``checkpoint`` was made
    with another teacher or student shape than ``module`` (an APMModule)."""
    saved_hp = {k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items() if k not in RUNTIME_ONLY}
    own_hp = {k: v for k, v in dict(module.hparams).items() if k not in RUNTIME_ONLY}
    saved = (checkpoint.get("apm") or {}).get("teacher")
    teacher_changed = (saved is not None and teacher_fingerprint(saved) != teacher_fingerprint(module.teacher)) or any(
        k in saved_hp and json_normal(saved_hp[k]) != json_normal(own_hp.get(k))
        for k in ("teacher", "teacher_args", "teachers"))
    sd, own = checkpoint.get("state_dict") or {}, module.state_dict()
    shapes = [f"parameter {k} is {tuple(sd[k].shape)} in the checkpoint, {tuple(own[k].shape)} here"
              for k in own if k in sd and hasattr(sd[k], "shape") and tuple(sd[k].shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if not (teacher_changed or shapes or missing or unexpected):
        return
    diffs = [f"{_setting(k)} is {saved_hp.get(k)!r} in the checkpoint but {own_hp.get(k)!r} here"
             for k in sorted(SHAPE_SETTINGS) if json_normal(saved_hp.get(k)) != json_normal(own_hp.get(k))]
    if teacher_changed and not any(d.startswith(("model.teacher", "data.image_size")) for d in diffs):
        diffs.append(f"its teacher was {_brief(saved)}, this run's is {_brief(module.teacher.describe())}")
    details = shapes[:2]
    if missing:
        details.append(f"{len(missing)} parameters missing from the checkpoint ({missing[0]}, ...)")
    if unexpected:
        details.append(f"{len(unexpected)} parameters this model lacks ({unexpected[0]}, ...)")
    problems = diffs or ["the parameters differ"]
    if details:
        problems[-1] += f" ({'; '.join(details)})"
    where = f"{str(path)!r}" if path else "the checkpoint"
    raise ConfigError(
        f"Setting {setting!r}: {where} was trained with another teacher or student shape, so it "
        f"cannot be loaded into this run: {'; '.join(problems)}. Use the settings it was trained "
        f"with (its run folder keeps them in config.yaml), point {setting!r} at a checkpoint of "
        f"this configuration, or drop {setting!r} to start a new run."
    )


def _brief(desc: dict | None) -> str:
    if not desc:
        return "unknown"
    if desc.get("members"):  # a TeacherSet
        return "the set " + " + ".join(f"{m.get('alias')} ({_brief(m)})" for m in desc["members"])
    levels = desc.get("levels") or []
    name = desc.get("model_name") or desc.get("class", "?")
    weights = f", weights {desc['weights_source']}" if desc.get("weights_source") else ""
    return f"{name} at {desc.get('image_size')} px with {len(levels)} levels{weights}"
