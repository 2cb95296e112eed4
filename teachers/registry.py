"""Teacher registry in the shape of timm's ``create_model``.

An adapter module registers a factory under a name with ``@register_teacher``; ``create_teacher``
builds one by name. Names may also be ``"some.module:name"``: the module is imported first, so a
teacher defined outside this package (your own file) registers itself and is selected by a config.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Callable

from teachers.base import Teacher
from teachers.errors import ConfigError

_REGISTRY: dict[str, Callable[..., Teacher]] = {}
_DISCOVERED = False


def register_teacher(fn: Callable[..., Teacher] | None = None, *, name: str | None = None):
    """Decorator: register a factory (a function or a Teacher class) under ``name`` (default: its
    ``__name__``). Registering a taken name with a different factory is an error."""

    def deco(f: Callable[..., Teacher]) -> Callable[..., Teacher]:
        key = name or f.__name__
        old = _REGISTRY.get(key)
        if old is not None and old.__qualname__ != f.__qualname__:
            raise ValueError(f"teacher name {key!r} is already registered by {old.__module__}")
        _REGISTRY[key] = f
        return f

    return deco(fn) if fn is not None else deco


def _discover() -> None:
    """Import every module of the ``teachers`` package once, so each registers its names."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):  # this package's folder
        if info.name not in {"base", "errors", "registry"} and not info.name.startswith("_"):
            importlib.import_module(f"teachers.{info.name}")
    _DISCOVERED = True


def list_teachers() -> list[str]:
    """Sorted names of all registered teachers."""
    _discover()
    return sorted(_REGISTRY)


def create_teacher(name: str, **kwargs) -> Teacher:
    """Build a registered teacher by name; ``kwargs`` go to its factory.

    ``name`` may be ``"package.module:registered_name"`` to import a teacher module that lives
    outside this package before looking the name up.
    """
    _discover()
    if ":" in name:
        module, _, name = name.partition(":")
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(
                f"Setting 'model.teacher': cannot import teacher module {module!r} ({e}). Make sure "
                f"it is importable (installed, or its folder on PYTHONPATH)."
            ) from None
    if name not in _REGISTRY:
        raise ConfigError(
            f"Setting 'model.teacher': unknown teacher {name!r}. Registered teachers: "
            f"{', '.join(sorted(_REGISTRY))}. Pick one of these, or register your own in a file under "
            f"teachers/ (see README, 'Adding a teacher') or as 'your.module:name'."
        )
    try:
        return _REGISTRY[name](**kwargs)
    except TypeError as e:
        if "argument" not in str(e):
            raise
        raise ConfigError(
            f"Setting 'model.teacher_args' for teacher {name!r}: {e}. Check the argument names "
            f"against the factory's signature (python -c \"import teachers, inspect; "
            f"print(inspect.signature(teachers.registry._REGISTRY[{name!r}]))\")."
        ) from None
