"""Checkpoints that survive interruptions and load safely.

- :class:`AtomicCheckpointIO` writes a checkpoint to a temporary file in the same folder and moves
  it into place with ``os.replace``, so a process killed during a save leaves the previous file
  intact; it loads with ``weights_only=True`` (tensors and plain types only: no pickled code runs).
- :class:`CheckpointOnStop` saves ``last.ckpt`` when the run receives SIGTERM (at the end of the
  current batch) and when training ends between two periodic saves.
- :func:`check_compatible` refuses a checkpoint of another teacher or student shape with a
  ConfigError naming the settings that differ; :func:`load_module` loads a checkpoint for tools.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import sys
import uuid
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from apm.cache import json_normal
from apm.errors import APMError, ConfigError

# Settings that change what is computed but not what a checkpoint holds.
RUNTIME_ONLY = {"_instantiator", "_class_path", "compile", "feature_cache", "max_nonfinite_steps"}
# Settings that decide the teacher's features or the student's parameter shapes.
SHAPE_SETTINGS = {"teacher", "teacher_args", "image_size", "patch_size", "hidden_dims", "pe_dim",
                  "level_dim", "rgb"}
# Settings that the data module owns (linked into the model by the CLI).
DATA_SETTINGS = {"image_size"}


def _is_local(path: Any) -> bool:
    return "://" not in str(path)


def read_checkpoint(path: str | Path, setting: str = "ckpt_path") -> dict[str, Any]:
    """Load a checkpoint file with ``weights_only=True``; APMError naming ``setting`` when it is
    missing, truncated, or holds pickled objects beyond tensors and plain types."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"Setting {setting!r}: {str(path)!r} is not a file. Give the path of a .ckpt "
                          f"written by 'apm fit' (or 'last' to resume from the newest last.ckpt).")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
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
        ckpt = read_checkpoint(path, "ckpt_path")
        return ckpt


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


def _last_path(cb: ModelCheckpoint) -> str:
    if cb.last_model_path:
        return cb.last_model_path
    return os.path.join(cb.dirpath, cb.CHECKPOINT_NAME_LAST + cb.FILE_EXTENSION)


class CheckpointOnStop(L.Callback):
    """Save ``last.ckpt`` when a SIGTERM stops the run (Lightning raises at the end of the current
    batch on every rank) and when training ends after the last periodic save.

    The file is the one every ``ModelCheckpoint(save_last=True)`` writes, so ``--ckpt_path last``
    resumes from it; without such a callback it goes next to the first ModelCheckpoint's files.
    """

    def _targets(self, trainer: L.Trainer, stopping: bool) -> list[tuple[ModelCheckpoint | None, str]]:
        cbs = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
        lasts = [cb for cb in cbs if cb.save_last and cb.dirpath]
        if lasts:
            return [(cb, _last_path(cb)) for cb in lasts]
        if not stopping:
            return []
        folder = cbs[0].dirpath if cbs and cbs[0].dirpath else trainer.default_root_dir
        return [(None, os.path.join(folder, "last.ckpt"))]

    def _save(self, trainer: L.Trainer, stopping: bool) -> list[str]:
        saved = []
        for cb, path in self._targets(trainer, stopping):
            if cb is not None:
                if getattr(cb, "_last_global_step_saved", -1) == trainer.global_step and os.path.exists(path):
                    continue  # already current
                cb.last_model_path = path  # part of the saved state, as ModelCheckpoint does
            trainer.save_checkpoint(path, weights_only=False)
            if cb is not None and hasattr(cb, "_last_global_step_saved"):
                cb._last_global_step_saved = trainer.global_step
            saved.append(path)
        return saved

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.fast_dev_run:
            self._save(trainer, stopping=False)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.sanity_checking or trainer.fast_dev_run:
            return
        saved = self._save(trainer, stopping=True)
        if trainer.is_global_zero:
            where = ", ".join(str(Path(p).resolve()) for p in saved) or "the last checkpoint (already current)"
            print(f"Received SIGTERM: saved {where} at step {trainer.global_step}; continue the run "
                  f"with the same command plus --ckpt_path last.", file=sys.stderr, flush=True)


def add_defaults(plugins: Any, callbacks: Any) -> tuple[list, list]:
    """The trainer's plugins and callbacks plus AtomicCheckpointIO and CheckpointOnStop, unless a
    CheckpointIO plugin or a CheckpointOnStop callback is already given."""
    from lightning.fabric.plugins import CheckpointIO

    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    callbacks = [] if callbacks is None else list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    if not any(isinstance(c, CheckpointOnStop) for c in callbacks):
        callbacks.append(CheckpointOnStop())
    return plugins, callbacks


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
    teacher_changed = (saved is not None and json_normal(saved) != json_normal(module.teacher.describe())) or any(
        k in saved_hp and json_normal(saved_hp[k]) != json_normal(own_hp.get(k)) for k in ("teacher", "teacher_args"))
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
    levels = desc.get("levels") or []
    name = desc.get("model_name") or desc.get("class", "?")
    return f"{name} at {desc.get('image_size')} px with {len(levels)} levels"


def load_module(path: str | Path, map_location: Any = "cpu", setting: str = "--ckpt", **overrides: Any):
    """An APMModule from a checkpoint written by ``apm fit``, read with ``weights_only=True``
    (``overrides`` replace saved hyperparameters; a change of shape is refused with ConfigError)."""
    from apm.module import APMModule

    ckpt = read_checkpoint(path, setting)
    hp = {k: v for k, v in (ckpt.get("hyper_parameters") or {}).items() if not k.startswith("_")}
    module = APMModule(**{**hp, **overrides})
    check_compatible(ckpt, module, path, setting)
    module.load_state_dict(ckpt["state_dict"])
    return module.to(map_location).eval()
