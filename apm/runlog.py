"""Per-image runs that resume: one JSON line per finished image, and a seed per image.

``apm perceive`` and ``apm classify`` append a line per image as they go, so a killed run loses at
most the image in progress. A rerun into the same folder skips the images already there, but only
when the earlier lines were written with the same settings (checkpoint, recipe, seed, ...): results
of other settings are never mixed into one file. Each image's seed comes from its key (its name or
path), not from its position in the input list, so adding or removing other images redoes an
image exactly.
"""

from __future__ import annotations

import json
import warnings
import zlib
from pathlib import Path
from typing import Any

from apm.errors import ConfigError


def image_seed(key: str, seed: int = 0) -> int:
    """The seed of the image keyed ``key`` in a run seeded ``seed``: ``seed`` plus a hash of the key."""
    return (int(seed) + zlib.crc32(str(key).encode())) % 2**31


def read_log(log: Path, command: str, warn: bool = True) -> list[dict[str, Any]]:
    """The JSON lines already written to ``log`` (none if it does not exist). A last line cut off
    by an interruption is dropped; with ``warn`` that is said and the file is rewritten clean, so
    the next line starts on a line of its own. A bad line elsewhere is a ConfigError."""
    log = Path(log)
    if not log.exists():
        return []
    text = log.read_text(encoding="utf-8")
    lines = text.splitlines()
    out, cut = [], False
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if n < len(lines):
                raise ConfigError(f"{log} line {n} is not JSON; it is not a file {command} wrote, or "
                                  f"it was edited: give another '--out' or delete it.") from None
            cut = True
    if warn and (cut or (text and not text.endswith("\n"))):
        if cut:
            warnings.warn(f"{log}: dropped the incomplete last line (an interrupted run); that "
                          f"image is done again.", stacklevel=2)
        log.write_text("".join(json.dumps(x) + "\n" for x in out), encoding="utf-8")
    return out


def added_settings() -> dict[str, Any]:
    """Settings added after logs were first written, and the value a line without them was run
    with: the fitting route's defaults."""
    from apm.perceive import FitRecipe

    return FitRecipe().route()


def settings_conflict(lines: list[dict[str, Any]], settings: dict[str, Any], log: Path) -> str | None:
    """None when every line of ``log`` was written with ``settings`` (each line carries them; a
    line from before a setting existed counts as its ``added_settings`` value), else one sentence
    naming the settings that differ and the way out."""
    other: dict[str, tuple[Any, Any]] = {}
    added = added_settings()
    for line in lines:
        for k, v in settings.items():
            was = line.get(k, added.get(k))
            if k not in other and json.loads(json.dumps(was)) != json.loads(json.dumps(v)):
                other[k] = (was, v)
    if not other:
        return None
    diff = "; ".join(f"{k} {a!r} there, {b!r} now" for k, (a, b) in other.items())
    return (f"{log} holds results of other settings ({diff}): give another '--out' or delete that "
            f"file to start over")


def resume(log: Path, settings: dict[str, Any], command: str) -> dict[str, dict[str, Any]]:
    """The lines of an earlier run into ``log``, keyed by ``image``, after checking they were
    written with ``settings`` (ConfigError naming the differences otherwise)."""
    lines = read_log(log, command)
    problem = settings_conflict(lines, settings, log)
    if problem:
        raise ConfigError(f"{command} cannot resume: {problem}.")
    return {line["image"]: line for line in lines}
