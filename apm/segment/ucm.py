"""The benchmark's own segmenter, gPb-owt-ucm, from its ultrametric contour maps (``ucm2``: twice the
photograph's resolution plus one, boundaries between pixels): the segmentation at a threshold and
the boundary strength, as the benchmark's evaluation reads them; and the benchmark's other input
formats (``segs``: a cell of segmentations; boundary-probability PNGs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from apm.segment.truth import BadGroundTruth


def _load(path: str | Path, name: str) -> np.ndarray:
    import scipy.io

    try:
        value = scipy.io.loadmat(str(path)).get(name)
    except Exception as e:  # scipy raises many types for broken files
        raise BadGroundTruth(f"{path}: not a readable .mat file ({type(e).__name__}: {str(e)[:120]})") from None
    if value is None:
        raise BadGroundTruth(f"{path}: no {name!r} variable")
    return value


def read_ucm2(path: str | Path, image_hw: tuple[int, int] | None = None) -> np.ndarray:
    """The ``ucm2`` map of a ``.mat`` file, float64 (2H+1, 2W+1); BadGroundTruth (naming the
    file) when it is missing or not twice ``image_hw`` plus one."""
    ucm = np.asarray(_load(path, "ucm2"), np.float64)
    if ucm.ndim != 2 or (image_hw is not None and ucm.shape != (2 * image_hw[0] + 1, 2 * image_hw[1] + 1)):
        raise BadGroundTruth(f"{path}: 'ucm2' is {ucm.shape}, expected twice the photograph's "
                             f"{image_hw} plus one")
    return ucm


def read_segs(path: str | Path) -> list[np.ndarray]:
    """The segmentations of a benchmark ``segs`` file (a cell of label maps), int64."""
    return [np.asarray(s, np.int64) for s in np.asarray(_load(path, "segs"), dtype=object).ravel()]


def ucm_regions(ucm2: np.ndarray, t: float) -> np.ndarray:
    """The segmentation at threshold ``t``: 8-connected regions of ``ucm2 <= t``, read at the
    pixels (rows and columns 1, 3, ... from 0: MATLAB's 2:2:end), labels from 1."""
    from scipy.ndimage import label

    labels, _ = label(np.asarray(ucm2) <= t, structure=np.ones((3, 3), int))
    return labels[1::2, 1::2]


def ucm_strength(ucm2: np.ndarray) -> np.ndarray:
    """The boundary strength at the pixels' corners, (H, W): MATLAB's ``ucm2(3:2:end, 3:2:end)``."""
    return np.asarray(ucm2, np.float64)[2::2, 2::2]


def read_strength_png(path: str | Path) -> np.ndarray:
    """A boundary-probability image in [0, 1] (8-bit grey divided by 255)."""
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img, np.float64) / 255.0
