"""Ground truth: human segmentations read from BSDS ``.mat`` files or PNG label maps, cropped as the
images are, and scored against a machine's label map (``Truth.score``, the one scoring path).

Ground truth is found by image name in one folder (``find_truth``): ``<dir>/<name>.mat`` (a 1xN
cell ``groundTruth`` of structs with ``Segmentation``, uint16 labels from 1), ``<dir>/<name>/*.png``
(one PNG per annotator) or ``<dir>/<name>.png`` (one annotator). For the 224-px protocol it is
cropped as the image is (``apm.data.image_transform``: shorter side resized to the input size,
centre square), by nearest neighbour (``crop_truth``); at full resolution it is used as drawn.

Islands on a level's grid (h, w) are scored at the ground truth's pixels by nearest neighbour
without making the upsampled map: ``Truth.counts`` holds, per grid cell, how many pixels of each
annotated region it covers, so one contingency table is a matrix product. A label map of the
ground truth's own size is scored directly.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from apm.errors import APMError
from apm.segment.measures import compact, contingency, mean_scores


class BadGroundTruth(APMError, ValueError):
    """A ground-truth file that cannot be used: unreadable, not in the expected layout, or not the
    size of its image."""


def _struct_field(item, name: str):
    """A field of one element of a MATLAB cell of structs as loadmat returns it."""
    names = getattr(getattr(item, "dtype", None), "names", None)
    if not names or name not in names:
        raise KeyError(name)
    value = item[name]
    while isinstance(value, np.ndarray) and value.dtype == object and value.size == 1:
        value = value.ravel()[0]  # loadmat wraps a struct's fields in (1, 1) object arrays
    return value


def read_mat(path: str | Path) -> list[np.ndarray]:
    """The annotators' label maps of a BSDS ``.mat`` file (a 1xN cell ``groundTruth`` of structs
    with a ``Segmentation`` field); BadGroundTruth naming the file otherwise."""
    import scipy.io

    try:
        cells = scipy.io.loadmat(str(path)).get("groundTruth")
    except Exception as e:  # scipy raises many types for broken files
        raise BadGroundTruth(f"{path}: not a readable .mat file ({type(e).__name__}: {str(e)[:120]})") from None
    if cells is None:
        raise BadGroundTruth(f"{path}: no 'groundTruth' variable (BSDS layout: a 1xN cell of structs "
                             f"with a 'Segmentation' field)")
    maps = []
    for item in np.asarray(cells).ravel():
        try:
            seg = np.asarray(_struct_field(item, "Segmentation"))
        except (KeyError, IndexError, TypeError, ValueError):
            raise BadGroundTruth(f"{path}: an entry of 'groundTruth' has no 'Segmentation' field") from None
        maps.append(check_map(seg, path))
    if not maps:
        raise BadGroundTruth(f"{path}: 'groundTruth' holds no segmentation")
    return maps


def check_map(seg: np.ndarray, path: str | Path) -> np.ndarray:
    """A label map as int64, or BadGroundTruth: it must be a non-empty 2-D array of integers."""
    if seg.ndim != 2 or seg.size == 0 or seg.dtype.kind not in "uifb":
        raise BadGroundTruth(f"{path}: a segmentation is not a 2-D label map (shape {seg.shape}, "
                             f"type {seg.dtype})")
    if seg.dtype.kind == "f" and not np.array_equal(seg, np.round(seg)):
        raise BadGroundTruth(f"{path}: a segmentation holds non-integer labels")
    return seg.astype(np.int64)


def read_png(path: str | Path) -> np.ndarray:
    """One annotator's label map from a PNG: grey levels or palette indices are labels; in a colour
    PNG every distinct colour is one region (alpha ignored)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr"):
                rgb = np.asarray(img.convert("RGB"), dtype=np.int64)
                arr = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
            else:
                arr = np.asarray(img)
    except Exception as e:
        raise BadGroundTruth(f"{path}: not a readable PNG label map ({type(e).__name__})") from None
    return check_map(np.asarray(arr), path)


def find_truth(folder: str | Path) -> dict[str, Path]:
    """Ground truth by image name in ``folder``: ``<name>.mat``, a folder ``<name>/`` of PNGs (one
    per annotator), or ``<name>.png`` (one annotator), in that order of preference."""
    folder = Path(folder)
    found: dict[str, Path] = {}
    for kind in ("mat", "dir", "png"):
        for p in sorted(folder.iterdir()):
            is_kind = (p.is_dir() and any(p.glob("*.png"))) if kind == "dir" else (
                p.is_file() and p.suffix.lower() == f".{kind}")
            if is_kind:
                found.setdefault(p.stem if kind != "dir" else p.name, p)
    return found


def read_truth(path: str | Path, image_hw: tuple[int, int] | None = None) -> list[np.ndarray]:
    """Every annotator's map of one image (a ``.mat``, a PNG or a folder of PNGs); BadGroundTruth
    when unreadable or when a map is not ``image_hw`` (rows, columns) in size."""
    path = Path(path)
    if path.is_dir():
        maps = [read_png(p) for p in sorted(path.glob("*.png"))]
    elif path.suffix.lower() == ".mat":
        maps = read_mat(path)
    else:
        maps = [read_png(path)]
    if not maps:
        raise BadGroundTruth(f"{path}: no label map")
    for m in maps:
        if image_hw is not None and tuple(m.shape) != tuple(image_hw):
            raise BadGroundTruth(f"{path}: a label map is {m.shape[0]}x{m.shape[1]} (rows x columns), "
                                 f"its image {image_hw[0]}x{image_hw[1]}")
    return maps


def crop_truth(gt: np.ndarray, size: int) -> np.ndarray:
    """A label map cropped as its image is for the student (shorter side resized to ``size``,
    centre square), by nearest neighbour at pixel centres; labels renumbered 0..m-1."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    t = torch.from_numpy(compact(gt).astype(np.float32))[None]  # exact below 2^24 labels
    t = TF.resize(t, [size], interpolation=InterpolationMode.NEAREST_EXACT, antialias=False)
    return compact(TF.center_crop(t, [size, size])[0].numpy().astype(np.int64))


def cell_counts(gt: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(h*w, m): per cell of a grid laid over the map, the pixels of each region (labels 0..m-1)
    whose centre falls in it: a grid map's nearest-neighbour upsampling, as counts."""
    (H, W), (h, w) = gt.shape, grid
    rows = np.minimum(((np.arange(H) + 0.5) * h / H).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(W) + 0.5) * w / W).astype(np.int64), w - 1)
    cell = rows[:, None] * w + cols[None, :]
    m = int(gt.max()) + 1
    return np.bincount((cell * m + gt).ravel(), minlength=h * w * m).reshape(h * w, m)


def upsample_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A grid's label map (h, w) enlarged to ``shape`` by nearest neighbour at pixel centres (the
    map ``cell_counts`` scores)."""
    (h, w), (H, W) = labels.shape, shape
    rows = np.minimum(((np.arange(H) + 0.5) * h / H).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(W) + 0.5) * w / W).astype(np.int64), w - 1)
    return labels[rows][:, cols]


@dataclass
class Truth:
    """One image's ground truth: ``maps`` (one map per annotator, labels 0..m-1), cropped for the
    grid protocol or the photograph's own pixels at full resolution."""

    name: str
    source: Path | None
    maps: list[np.ndarray]
    _counts: dict = field(default_factory=dict, repr=False)

    def counts(self, grid: tuple[int, int]) -> list[np.ndarray]:
        if grid not in self._counts:
            self._counts[grid] = [cell_counts(m, grid) for m in self.maps]
        return self._counts[grid]

    def tables(self, labels: np.ndarray) -> list[np.ndarray]:
        """Contingency tables (machine regions, annotated regions), one per annotator, of a label
        map of the ground truth's size or of a coarser grid (upsampled by nearest neighbour)."""
        if tuple(labels.shape) == tuple(self.maps[0].shape):
            return [contingency(labels, m) for m in self.maps]
        lab = compact(labels).ravel()
        onehot = np.zeros((int(lab.max()) + 1, lab.size))
        onehot[lab, np.arange(lab.size)] = 1
        return [onehot @ c for c in self.counts(tuple(labels.shape))]

    def score(self, labels: np.ndarray) -> dict[str, float]:
        """The measures of a label map against every annotator (mean over them)."""
        return mean_scores(self.tables(labels))


def region_scores(seg: np.ndarray, truths: np.ndarray | Sequence[np.ndarray]) -> dict[str, float]:
    """covering, pri, vi, ari of a machine label map against one annotator's map or a list of
    them (each measure averaged over annotators); all maps of one shape. ``Truth.score``."""
    truths = [truths] if isinstance(truths, np.ndarray) else list(truths)
    return Truth("", None, [np.asarray(t) for t in truths]).score(np.asarray(seg))


def covering(seg: np.ndarray, truths: np.ndarray | Sequence[np.ndarray]) -> float:
    """Segmentation covering of the ground truth by ``seg`` (mean over annotators)."""
    return region_scores(seg, truths)["covering"]


def pri(seg: np.ndarray, truths: np.ndarray | Sequence[np.ndarray]) -> float:
    """Probabilistic Rand Index: the Rand index averaged over annotators."""
    return region_scores(seg, truths)["pri"]


def vi(seg: np.ndarray, truths: np.ndarray | Sequence[np.ndarray]) -> float:
    """Variation of information in bits, averaged over annotators."""
    return region_scores(seg, truths)["vi"]


def ari(seg: np.ndarray, truths: np.ndarray | Sequence[np.ndarray]) -> float:
    """Adjusted Rand index, averaged over annotators."""
    return region_scores(seg, truths)["ari"]


def load_truth(name: str, path: Path, image_hw: tuple[int, int], size: int) -> Truth:
    """``read_truth`` of one image, cropped to ``size`` (BadGroundTruth when unusable)."""
    return Truth(name, path, [crop_truth(m, size) for m in read_truth(path, image_hw)])


def match_truth(names: Sequence[str], sizes: Sequence[tuple[int, int]], folder: str | Path,
                size: int) -> tuple[dict[str, Truth], list[str]]:
    """Ground truth for each image name (original size (rows, columns)); a missing or bad file is
    named in a warning and its image skipped. Returns the truths and the skip messages."""
    found = find_truth(folder)
    truths, skipped = {}, []
    for name, hw in zip(names, sizes):
        try:
            if name not in found:
                raise BadGroundTruth(f"{name}: no ground truth in {folder} ({name}.mat, {name}/*.png "
                                     f"or {name}.png)")
            truths[name] = load_truth(name, found[name], hw, size)
        except BadGroundTruth as e:
            warnings.warn(f"skipped: {e}", stacklevel=2)
            skipped.append(str(e))
    return truths, skipped


