"""A teacher-feature cache: each training image's teacher features written once, read back later.

Layout of the cache folder::

    manifest.json              teacher name, arguments, describe(), weight checksum, image list,
                               levels, shard size
    filled.npy                 (N,) uint8: 1 once an image's features are on disk
    {level}-{shard:05d}.npy    (n, h, w, d) float16, memory-mapped; shard k holds images
                               k*shard_size ... (k+1)*shard_size - 1

Everything is plain JSON and ``.npy`` read with ``allow_pickle=False``: opening a cache runs no code.
A cache built for another teacher (name, arguments, architecture, weights) or another image list is
refused with a ConfigError; it is never silently reused.

Several teachers (``model.teachers``) get one such cache each, in a sub-folder named by the
teacher's alias (:class:`FeatureCacheSet`), each checked against its own teacher: adding a teacher to
a run fills only the new teacher's folder, and reordering the list refills nothing.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from apm.errors import ConfigError
from teachers.base import Level, Teacher

MANIFEST = "manifest.json"
FORMAT = 1


def teacher_fingerprint(teacher: Teacher | dict[str, Any]) -> dict[str, Any]:
    """A teacher's ``describe()`` (or a recorded one) without its Python class path: a teacher is
    known by its registered name and arguments, so moving or renaming its file changes nothing."""
    desc = teacher if isinstance(teacher, dict) else teacher.describe()
    return json_normal({k: v for k, v in desc.items() if k != "class"})


def teacher_identity(name: str, args: dict[str, Any] | None, teacher: Teacher,
                     input_size: int | None = None) -> dict[str, Any]:
    """What makes two teachers' features interchangeable: registered name, arguments, the
    fingerprint of ``describe()`` and a checksum of the weights (so random teachers with other
    seeds, or other weights, differ). ``input_size``: the side of the images a set member is given
    before it resizes them to its own (recorded when the two differ: the resize changes the
    features)."""
    with torch.no_grad():
        checksum = float(sum(p.detach().double().sum().item() for p in teacher.parameters()))
    identity = {"name": name, "args": args or {}, "describe": teacher_fingerprint(teacher),
                "weights_checksum": checksum}
    if teacher.precision != "32":  # fp32 caches written before teacher precision existed stay valid
        identity["precision"] = teacher.precision
    if input_size is not None and input_size != teacher.image_size:
        identity["input_size"] = int(input_size)
    return json_normal(identity)


def json_normal(x: Any) -> Any:
    """JSON-normal form (tuples become lists, keys sorted) so that comparisons ignore types."""
    return json.loads(json.dumps(x, sort_keys=True, default=str))


def estimate_bytes(levels: Sequence[Level], num_images: int) -> int:
    """Disk size of a float16 cache of ``levels`` for ``num_images`` images."""
    return 2 * num_images * sum(l.grid[0] * l.grid[1] * l.dim for l in levels)


def safe_filename(name: str) -> str:
    """``name`` (a level name, e.g. ``dinov2_small/block12``) as one file-name component: characters
    other than letters, digits, ``_``, ``.`` and ``-`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


class FeatureCache:
    """Float16, sharded, memory-mapped teacher features of a fixed list of images.

    Use :meth:`open`, which creates the folder or checks that an existing one matches.
    """

    def __init__(self, root: str | Path, manifest: dict[str, Any]):
        self.root = Path(root)
        self.manifest = manifest
        self.levels = [Level(n, tuple(g), d) for n, g, d in manifest["levels"]]
        self.num_images = len(manifest["images"])
        self.shard_size = int(manifest["shard_size"])
        self.filled = np.load(self.root / "filled.npy", mmap_mode="r+", allow_pickle=False)
        self._shards: dict[tuple[int, int], np.memmap] = {}

    # -- creation and checks ---------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | Path, identity: dict[str, Any], levels: Sequence[Level],
             images: Sequence[str | Path], shard_size: int = 256, setting: str = "model.feature_cache",
             verbose: bool = True) -> "FeatureCache":
        """Open the cache at ``root`` for this teacher ``identity`` and image list, creating it
        (after printing its estimated size) when the folder has no manifest yet.

        Raises:
            ConfigError: the folder holds a cache of another teacher or other images, or the disk
                has not enough free space for a new one.
        """
        root = Path(root)
        images = [str(s) for s in images]
        wanted = json_normal({"format": FORMAT, "teacher": identity, "images": images,
                         "levels": [(l.name, list(l.grid), l.dim) for l in levels]})
        path = root / MANIFEST
        if path.exists():
            with open(path) as f:
                found = json.load(f)
            cls._check(found, wanted, root, setting)
            cache = cls(root, found)
            cache._create_shards()  # any missing: caches of earlier versions made them as they went
            return cache
        if root.is_dir() and any((d / MANIFEST).exists() for d in root.iterdir() if d.is_dir()):
            raise ConfigError(
                f"Setting {setting!r}: {root} holds the per-teacher caches of a run with "
                f"'model.teachers' (one sub-folder each), not a cache of one teacher. Point "
                f"{setting!r} at one of those sub-folders if it is this teacher's, or at a new folder."
            )
        size = estimate_bytes(levels, len(images))
        root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(root).free
        if verbose:
            print(f"teacher-feature cache: {len(images)} images x {len(levels)} levels, float16 -> "
                  f"{human(size)} in {root} ({human(free)} free)", flush=True)
        if size > free:
            raise ConfigError(
                f"Setting {setting!r}: the cache needs about {human(size)} but {root} has only "
                f"{human(free)} free. Point it at a larger disk, use fewer images or levels, or unset it."
            )
        manifest = {**wanted, "shard_size": int(shard_size), "dtype": "float16"}
        np.lib.format.open_memmap(root / "filled.npy", mode="w+", dtype=np.uint8,
                                  shape=(len(images),)).flush()
        cache = cls(root, manifest)
        cache._create_shards()
        with open(root / (MANIFEST + ".tmp"), "w") as f:
            json.dump(manifest, f, indent=1)
        (root / (MANIFEST + ".tmp")).replace(path)  # the manifest appears last, complete
        return cache

    def _shard_path(self, level: int, shard: int) -> Path:
        return self.root / f"{safe_filename(self.levels[level].name)}-{shard:05d}.npy"

    def _create_shards(self) -> None:
        """Every shard file not there yet, zero-filled, before any write. Made by the process that
        opens the cache first (rank 0 under DDP, before the other ranks open it): a shard made
        lazily by whichever rank wrote first would be truncated by another doing the same."""
        for j, lvl in enumerate(self.levels):
            for k in range(math.ceil(self.num_images / self.shard_size)):
                n = min(self.shard_size, self.num_images - k * self.shard_size)
                if self._shard_path(j, k).exists():
                    continue
                np.lib.format.open_memmap(self._shard_path(j, k), mode="w+", dtype=np.float16,
                                          shape=(n, *map(int, lvl.grid), int(lvl.dim))).flush()

    @staticmethod
    def _check(found: dict, wanted: dict, root: Path, setting: str) -> None:
        fix = (f"Point {setting!r} at a new folder for this run, or delete {root} to rebuild it.")
        if found.get("format") != wanted["format"]:
            raise ConfigError(f"Setting {setting!r}: {root} holds a cache of another format. {fix}")
        ft, wt = found["teacher"], wanted["teacher"]
        diffs = [k for k in ("name", "args", "precision", "input_size") if ft.get(k) != wt.get(k)]
        if teacher_fingerprint(ft.get("describe") or {}) != wt["describe"]:
            diffs.append("describe")
        a, b = ft.get("weights_checksum"), wt.get("weights_checksum")
        if a is None or b is None or not math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6):
            diffs.append("weights")
        if diffs:
            raise ConfigError(
                f"Setting {setting!r}: the cache in {root} was written by another teacher (differs in "
                f"{', '.join(diffs)}: recorded {ft.get('name')!r} {ft.get('args')}, this run "
                f"{wt.get('name')!r} {wt.get('args')}); its features would be wrong targets. {fix}"
            )
        if found["images"] != wanted["images"]:
            old, new = set(found["images"]), set(wanted["images"])
            what = (f"{len(new - old)} images not in the cache, {len(old - new)} cached images not in "
                    f"this run" if old != new else "the same images in another order")
            raise ConfigError(
                f"Setting {setting!r}: the cache in {root} was written for another image list "
                f"({len(found['images'])} recorded, {len(wanted['images'])} now; {what}). Check "
                f"'data.images', 'data.max_images', 'data.val_fraction' and 'data.seed'. {fix}"
            )
        if found["levels"] != wanted["levels"]:
            raise ConfigError(f"Setting {setting!r}: the cache in {root} holds other levels. {fix}")

    # -- reading and writing ---------------------------------------------------------------------
    def _shard(self, level: int, shard: int) -> np.memmap:
        key = (level, shard := int(shard))
        if key not in self._shards:
            path = self._shard_path(level, shard)
            if not path.exists():
                raise ConfigError(
                    f"Setting 'model.feature_cache': {path} is missing from the cache in {self.root} "
                    f"(deleted, or a cache from a version that made shards as it went). Delete the "
                    f"folder to rebuild the cache.")
            self._shards[key] = np.load(path, mmap_mode="r", allow_pickle=False)
        return self._shards[key]

    def has(self, index: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Bool (B,): which of these images are already cached."""
        idx = np.asarray(torch.as_tensor(index).cpu(), dtype=np.int64)
        return torch.from_numpy(self.filled[idx].astype(bool))

    def read(self, index: torch.Tensor | Sequence[int]) -> list[torch.Tensor]:
        """Per level, float32 features (B, h, w, d) of cached images ``index``."""
        idx = np.asarray(torch.as_tensor(index).cpu(), dtype=np.int64)
        out = []
        for j in range(len(self.levels)):
            rows = [self._shard(j, i // self.shard_size)[i % self.shard_size] for i in idx]
            out.append(torch.from_numpy(np.stack(rows).astype(np.float32)))
        return out

    def write(self, index: torch.Tensor | Sequence[int], feats: Sequence[torch.Tensor]) -> None:
        """Store per-level features (B, h, w, d) of images ``index`` and mark them cached."""
        idx = np.asarray(torch.as_tensor(index).cpu(), dtype=np.int64)
        for j, f in enumerate(feats):
            f = f.detach().to("cpu", torch.float16).numpy()
            if not np.isfinite(f).all():
                raise ConfigError(
                    f"Setting 'model.feature_cache': level {self.levels[j].name!r} has values beyond "
                    f"float16's range (|x| > 65504) or non-finite; unset the cache for this teacher."
                )
            for row, i in zip(f, idx):
                self._write_row(j, int(i), row)
        self.filled[idx] = 1  # after the data: a killed run never marks half-written features
        self.filled.flush()

    def _write_row(self, level: int, i: int, row: np.ndarray) -> None:
        """Image ``i``'s row of a level, written as exactly its own bytes (not through a memory
        map, whose whole-page write-back could overwrite rows that another rank, perhaps on
        another node of a shared file system, wrote into the same page)."""
        mm = self._shard(level, i // self.shard_size)
        data = np.ascontiguousarray(row, dtype=np.float16).tobytes()
        fd = os.open(mm.filename, os.O_WRONLY)
        try:
            os.pwrite(fd, data, mm.offset + (i % self.shard_size) * len(data))
            os.fsync(fd)
        finally:
            os.close(fd)

    @property
    def complete(self) -> bool:
        return bool(self.filled.all())


class FeatureCacheSet:
    """The caches of a TeacherSet's members: one :class:`FeatureCache` per teacher in the
    sub-folder named by its alias, each with its own identity and ``filled`` marks, so each
    teacher's features are written once whatever other teachers join or leave the run.

    Use :meth:`open`; ``parts[i]`` is member ``i``'s cache, holding its own (unprefixed) levels.
    """

    def __init__(self, root: str | Path, aliases: Sequence[str], parts: Sequence[FeatureCache]):
        self.root, self.aliases, self.parts = Path(root), list(aliases), list(parts)

    @classmethod
    def open(cls, root: str | Path, members: Sequence[tuple[str, dict[str, Any], Sequence[Level]]],
             images: Sequence[str | Path], shard_size: int = 256,
             setting: str = "model.feature_cache", verbose: bool = True) -> "FeatureCacheSet":
        """Open (or create) ``root/<alias>`` for each member ``(alias, identity, levels)``.

        Raises:
            ConfigError: ``root`` holds a single-teacher cache, or a member's folder holds another
                teacher's or other images' features (see :meth:`FeatureCache.open`).
        """
        root = Path(root)
        if (root / MANIFEST).exists():
            raise ConfigError(
                f"Setting {setting!r}: {root} holds the cache of a one-teacher run ('model.teacher'); "
                f"with 'model.teachers' each teacher's cache is a sub-folder named by its alias "
                f"({', '.join(a for a, _, _ in members)}). To reuse that teacher's features, move the "
                f"folder's files into {root}/<its alias>/; else point {setting!r} at a new folder."
            )
        parts = [FeatureCache.open(root / alias, identity, levels, images, shard_size, setting, verbose)
                 for alias, identity, levels in members]
        return cls(root, [a for a, _, _ in members], parts)

    @property
    def complete(self) -> bool:
        return all(p.complete for p in self.parts)
