"""File modes as a plain ``open``/``mkdir`` would give them (0666 / 0777 minus the umask), for
files that libraries write private (safetensors: 0600; ``tempfile.mkdtemp``: 0700), so that a
shared cache or a saved student is readable by whoever the umask allows."""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process's umask (read from /proc where it can be, so no thread sees it changed)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def usual_modes(path: str | Path) -> None:
    """Give ``path`` (and, for a folder, everything under it) the mode the umask allows: folders
    0777 & ~umask, files 0666 & ~umask."""
    mask, path = current_umask(), Path(path)
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
