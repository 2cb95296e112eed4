"""Asynchronous Perception Machine: distill a frozen vision transformer's per-layer token features
into a tiny student queried per (location, level)."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``from apm import APM`` without importing torch for ``apm --help``
    if name in ("APM", "Perception"):
        from apm import api

        return getattr(api, name)
    raise AttributeError(f"module 'apm' has no attribute {name!r}")
