"""Asynchronous Perception Machine: distill a frozen vision transformer's per-layer token features
into a tiny student queried per (location, level)."""

__version__ = "0.1.0"
