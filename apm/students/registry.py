"""Student registry in the shape of ``teachers.registry``: a student class is registered under a
name with its settings class (a ``StudentSettings`` dataclass); ``create_student`` builds one.

In a config the student is chosen by its settings class, which jsonargparse reads as a class path:

    model:
      student:
        class_path: apm.students.GLOMSettings
        init_args: {dim: 128, iterations: 3}

``student_settings`` turns any spelling (that, the name alone, a settings object, None for the
default ``apm``) into the settings object; ``settings_record`` into the plain dict a checkpoint keeps.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, fields
from typing import Any, Callable, Sequence

from apm.errors import ConfigError
from apm.students.base import Student, StudentSettings
from teachers.base import Level

DEFAULT_STUDENT = "apm"
_REGISTRY: dict[str, tuple[Callable[..., Student], type[StudentSettings]]] = {}


def register_student(name: str, settings: type[StudentSettings]):
    """Decorator: register a student class under ``name`` with its settings dataclass (whose
    ``name`` is set to ``name``). Registering a taken name with another class is an error."""

    def deco(cls: Callable[..., Student]) -> Callable[..., Student]:
        old = _REGISTRY.get(name)
        if old is not None and old[0].__qualname__ != cls.__qualname__:
            raise ValueError(f"student name {name!r} is already registered by {old[0].__module__}")
        settings.name = name
        _REGISTRY[name] = (cls, settings)
        return cls

    return deco


def list_students() -> list[str]:
    """Sorted names of all registered students."""
    return sorted(_REGISTRY)


def settings_class(name: str) -> type[StudentSettings]:
    """The settings dataclass of a registered student; ConfigError for an unknown name."""
    if name not in _REGISTRY:
        raise ConfigError(f"Setting 'model.student': {name!r} is not one of {', '.join(sorted(_REGISTRY))} "
                          f"(give a settings class such as apm.students.GLOMSettings, or register "
                          f"your own student with apm.students.register_student).")
    return _REGISTRY[name][1]


def student_settings(value: Any = None) -> StudentSettings:
    """The settings object of ``value``: a ``StudentSettings``, a registered name, a dict
    ``{class_path, init_args}`` (as jsonargparse and checkpoints write it) or ``{name, ...}``, or
    None for the default student. ConfigError naming ``model.student`` for an unknown name or key
    or a value the student cannot take."""
    if isinstance(value, StudentSettings):
        return value
    if value is None or isinstance(value, str):
        return _build(value or DEFAULT_STUDENT, {})
    value = dict(value)
    if "class_path" in value:
        cls = _import_class(value["class_path"])
        return _build(cls.name, dict(value.get("init_args") or {}), cls)
    return _build(value.pop("name", DEFAULT_STUDENT), value)


def _import_class(path: str) -> type[StudentSettings]:
    module, _, name = str(path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module or "apm.students"), name)
    except (ImportError, AttributeError, ValueError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, StudentSettings)):
        raise ConfigError(f"Setting 'model.student': {path!r} is not a student settings class; use "
                          f"{' or '.join(_class_path(s) for _, s in _REGISTRY.values())}.")
    return cls


def _build(name: str, given: dict[str, Any], cls: type[StudentSettings] | None = None) -> StudentSettings:
    cls = cls or settings_class(name)
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ConfigError(f"Setting 'model.student': {unknown} are not settings of the {cls.name!r} "
                          f"student; its settings are {', '.join(known)}.")
    try:
        return cls(**given)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"Setting 'model.student' ({cls.name}): {e}.") from None


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def settings_record(settings: StudentSettings) -> dict[str, Any]:
    """The plain dict a checkpoint and a config keep: ``{class_path, init_args}``."""
    return {"class_path": _class_path(type(settings)), "init_args": asdict(settings)}


def create_student(name: str, levels: Sequence[Level], image_size: int, patch_size: int,
                   **settings: Any) -> Student:
    """Build a registered student for ``levels`` on images of ``image_size`` read in patches of
    ``patch_size``; ``settings`` are its settings class's fields (an unset ``pe_max_freq`` follows
    the finest level's grid: half its side, the Nyquist limit)."""
    s = asdict(_build(name, settings))
    if s.get("pe_max_freq") is None:
        s["pe_max_freq"] = max(max(l.grid) for l in levels) / 2
    return _REGISTRY[name][0](list(levels), image_size, patch_size, **s)
