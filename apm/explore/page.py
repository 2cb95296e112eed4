"""The explore page as one HTML file: ``template.html`` with the page's code (``explore.js``) and
its data (JSON) written into it, so that it opens from disk with no server and no network."""

from __future__ import annotations

import base64
import io
import json
import re
from importlib import resources
from pathlib import Path

import numpy as np
import torch

FORMAT = "apm-explore/1"


def rle_encode(labels: np.ndarray) -> list[int]:
    """A label map as a run-length array over its cells in row-major order: [label, run length,
    label, run length, ...] (islands are runs along rows: a few numbers per row)."""
    flat = np.asarray(labels).ravel()
    if flat.size == 0:
        return []
    starts = np.flatnonzero(np.r_[True, flat[1:] != flat[:-1]])
    lengths = np.diff(np.r_[starts, flat.size])
    return np.stack([flat[starts], lengths], 1).ravel().astype(int).tolist()


def rle_decode(runs: list[int], shape: tuple[int, int]) -> np.ndarray:
    """The label map (rows, columns) of a run-length array of ``rle_encode``."""
    runs = np.asarray(runs, dtype=np.int64).reshape(-1, 2)
    flat = np.repeat(runs[:, 0], runs[:, 1])
    if flat.size != shape[0] * shape[1]:
        raise ValueError(f"run-length array of {flat.size} cells for a {shape[0]}x{shape[1]} map")
    return flat.reshape(shape)


def image_uri(image: torch.Tensor, quality: int = 90) -> str:
    """An image (3, S, S) in [0, 1] as a JPEG data URI."""
    from PIL import Image

    arr = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _asset(name: str) -> str:
    return resources.files("apm.explore").joinpath(name).read_text(encoding="utf-8")


def render_page(doc: dict) -> str:
    """The HTML of the page for ``doc`` (``format``, ``title``, ``size``, ``levels``, ``ks``,
    ``k``, ``sources``, ``photos``: see docs/explore.md)."""
    data = json.dumps({"format": FORMAT, **doc}, separators=(",", ":"))
    data = data.replace("<", "\\u003c")  # no "</script>" or "<!--" inside the data block
    script = _asset("explore.js")
    title = str(doc.get("title", "apm explore")).replace("&", "&amp;").replace("<", "&lt;")
    parts = {"TITLE": title, "DATA": data, "SCRIPT": script}  # one pass: no part is read as a placeholder
    return re.sub(r"\{\{(TITLE|DATA|SCRIPT)\}\}", lambda m: parts[m.group(1)], _asset("template.html"))


def write_page(doc: dict, path: str | Path) -> Path:
    """Write ``render_page(doc)`` to ``path`` (its folder made); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_page(doc), encoding="utf-8")
    return path
