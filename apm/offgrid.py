"""The teacher between its own cells: the truth off the grid, and what predicts it.

A ViT's features exist only at its cell centres. Run on the photograph moved by (dy, dx) pixels (a
window of the photograph starting (dy, dx) pixels in), a level's cell (i, j) sits at pixel
((i + 1/2) c + dy, (j + 1/2) c + dx) of the unmoved frame (c = side / grid, the level's cell in
pixels): those are the teacher's own features there ("shift and stitch"). In the student's [0, 1]
frame that is ((i + 1/2) / h + dy / S, (j + 1/2) / w + dx / S) for a frame of side S.

The moved windows need pixels past the frame's bottom and right edges: ``canvas`` holds them (a
larger resize of the photograph, the frame at its top left), or, for an image with nothing
beyond its frame, ``pad_canvas`` mirrors the frame's last pixels (reflection). Cells whose pixels
reach into a mirrored strip are then a mirror's truth; ``moved_targets`` can leave them out.

Predictors of the truth from teacher passes, for the off-grid measure (``apm eval --offgrid``,
``experiments/offgrid.py``): the nearest cell of the unmoved pass, bilinear interpolation of one
pass, bilinear interpolation of K passes moved on a finer lattice (equal teacher cost to a field
fitted on the same K passes), and the teacher's own consistency (the ceiling).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

from apm import metrics

Features = Callable[[torch.Tensor], list[torch.Tensor]]  # images (B, 3, S, S) -> per level (B, h, w, d)
EVAL_OFFSETS = ((4, 4), (4, 11), (11, 4), (11, 11))  # points 4 and 11 px off the 14-px cells' centres


def lattice(passes: int, patch: int) -> list[tuple[int, int]]:
    """``passes`` offsets (dy, dx) in pixels, a square lattice over one cell: 1 -> [(0, 0)],
    4 -> {0, p/2}^2, 9 -> {0, p/3, 2p/3}^2 (rounded to pixels). ValueError unless a square."""
    side = round(passes ** 0.5)
    if side < 1 or side * side != passes:
        raise ValueError(f"passes must be a square number (1, 4, 9, 16), got {passes}")
    steps = [round(patch * k / side) for k in range(side)]
    return list(itertools.product(steps, steps))


def pad_canvas(images: torch.Tensor, margin: int) -> torch.Tensor:
    """The images with ``margin`` pixels mirrored past their bottom and right edges: a canvas for
    moves of up to ``margin`` pixels when nothing beyond the frame is known."""
    if margin <= 0:
        return images
    return F.pad(images, (0, margin, 0, margin), mode="reflect")


Size = int | tuple[int, int]  # a frame's side, or its (height, width)


def _hw(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def window(canvas: torch.Tensor, size: Size, dy: int, dx: int) -> torch.Tensor:
    """The frame moved by (dy, dx): the canvas's window of ``size`` (a side, or (height, width))
    starting (dy, dx) pixels in."""
    h, w = _hw(size)
    if dy + h > canvas.shape[-2] or dx + w > canvas.shape[-1]:
        raise ValueError(f"a move of ({dy}, {dx}) px needs a canvas of at least {(h + dy, w + dx)} px; "
                         f"got {tuple(canvas.shape[-2:])}")
    return canvas[..., dy : dy + h, dx : dx + w]


def moved_coords(grid: tuple[int, int], size: Size, dy: float, dx: float,
                 device: torch.device | None = None) -> torch.Tensor:
    """Where the cells of a pass moved by (dy, dx) px sit in the unmoved frame of ``size`` (a side,
    or (height, width)): (h*w, 2) coordinates (y, x) in [0, 1], row-major."""
    h, w = grid
    height, width = _hw(size)
    ys = (torch.arange(h, device=device, dtype=torch.float64) + 0.5) / h + dy / height
    xs = (torch.arange(w, device=device, dtype=torch.float64) + 0.5) / w + dx / width
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([yy.flatten(), xx.flatten()], dim=-1).float()


@dataclass
class MovedPass:
    """One teacher pass on the frame moved by ``offset`` px: per level, features (B, h, w, d) and
    the coordinates (h*w, 2) of its cells in the unmoved frame."""

    offset: tuple[int, int]
    features: list[torch.Tensor]
    coords: list[torch.Tensor]


@torch.no_grad()
def moved_passes(features: Features, canvas: torch.Tensor, size: Size,
                 offsets: Sequence[tuple[int, int]]) -> list[MovedPass]:
    """The teacher (``features``: images -> per-level features) on the frame moved by each offset.

    Args:
        features: e.g. ``module.targets`` or a teacher's forward.
        canvas: (B, 3, H', W'), at least the frame plus the largest move: the frame at its top left.
        size: The frame's side S, or its (height, width) H x W.
        offsets: Moves (dy, dx) in pixels, each in [0, H' - H] x [0, W' - W].
    """
    out = []
    for dy, dx in offsets:
        feats = [f.float() for f in features(window(canvas, size, dy, dx).contiguous())]
        coords = [moved_coords(tuple(f.shape[1:3]), size, dy, dx, f.device) for f in feats]
        out.append(MovedPass((dy, dx), feats, coords))
    return out


def lattice_passes(module, images: torch.Tensor, passes: int, features: Sequence[torch.Tensor] | None = None,
                   canvas: torch.Tensor | None = None) -> list[MovedPass]:
    """``passes`` passes of ``module``'s teacher (``module.targets``) on the images moved by a
    lattice of sub-patch offsets (``lattice``), the unmoved one first (``features`` when given);
    the moved ones read ``canvas`` (real pixels past the frame) or, without it, the frame's last
    pixels mirrored. The images may be any (H, W) the teacher takes, not only square."""
    patch, size = module.student.patch_size, tuple(images.shape[-2:])
    offsets = lattice(passes, patch)
    canvas = pad_canvas(images, max(max(o) for o in offsets)) if canvas is None else canvas.to(images.device)
    moved = moved_passes(module.targets, canvas, size, offsets[1:])
    if features is None:
        with torch.no_grad():
            features = module.targets(images)
    first = MovedPass((0, 0), [f.to(images.device).float() for f in features],
                      [moved_coords(tuple(f.shape[1:3]), size, 0, 0, f.device) for f in features])
    return [first, *moved]


@torch.no_grad()
def moved_targets(features: Features, images: torch.Tensor, patch: int
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Distillation toward the truth off the grid: per level, the features (B, h, w, d) of each
    image moved by its own random offset of 0 to ``patch`` - 1 px (the frame's last pixels mirrored
    past its edge), and the coordinates (B, h*w, 2) in the unmoved frame where those cells sit."""
    size = images.shape[-1]
    moves = torch.randint(0, patch, (images.shape[0], 2)).tolist()
    canvas = pad_canvas(images, patch - 1)
    feats = [f.float() for f in features(torch.stack([window(c, size, dy, dx) for c, (dy, dx) in zip(canvas, moves)]))]
    points = [torch.stack([moved_coords(tuple(f.shape[1:3]), size, dy, dx, f.device) for dy, dx in moves])
              for f in feats]
    return feats, points


def inside(grid: tuple[int, int], size: int, frame: int, offset: tuple[int, int],
           device: torch.device | None = None) -> torch.Tensor:
    """(h*w,) bool: the cells of a pass moved by ``offset`` whose pixels all lie within the
    unmoved frame of side ``frame`` (no mirrored or outside pixel under them)."""
    h, w = grid
    ys = (torch.arange(h, device=device) + 1) * size / h + offset[0] <= frame
    xs = (torch.arange(w, device=device) + 1) * size / w + offset[1] <= frame
    return (ys[:, None] & xs[None, :]).flatten()


def stitch(passes: Sequence[MovedPass], level: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One level's cells of several passes as points: features (B, P, d) and coordinates (P, 2)."""
    feats = torch.cat([rearrange(p.features[level], "b h w d -> b (h w) d") for p in passes], dim=1)
    return feats, torch.cat([p.coords[level] for p in passes], dim=0)


# -- predictors of the truth from teacher passes -----------------------------------------------------
def bilinear_at(feats: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear interpolation of a grid of features (B, h, w, d) with cell centres at
    ((i + 1/2) / h, (j + 1/2) / w), at coordinates (N, 2) in [0, 1]; past the outer centres the
    edge value holds. Returns (B, N, d)."""
    grid = (coords.to(feats.device, torch.float32) * 2 - 1).flip(-1)  # (y, x) -> grid_sample's (x, y)
    grid = grid[None, :, None].expand(feats.shape[0], -1, -1, -1)
    out = F.grid_sample(rearrange(feats.float(), "b h w d -> b d h w"), grid, mode="bilinear",
                        padding_mode="border", align_corners=False)
    return rearrange(out, "b d n 1 -> b n d")


def nearest_at(feats: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """The features (B, N, d) of the cell of a grid (B, h, w, d) that contains each coordinate."""
    h, w = feats.shape[1:3]
    c = coords.to(feats.device)
    i = (c[:, 0] * h).floor().long().clamp(0, h - 1)
    j = (c[:, 1] * w).floor().long().clamp(0, w - 1)
    return feats[:, i, j].float()


def interleave(passes: Sequence[MovedPass], level: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K passes moved on a lattice (every dy with every dx, as ``lattice`` gives) as one rectilinear
    grid of K times the cells: features (B, H, W, d) and the positions of its rows (H,) and columns
    (W,) in the unmoved frame, cell-major, then the pass's offset (uneven lattices included)."""
    by_offset = {p.offset: p for p in passes}
    oys, oxs = sorted({o[0] for o in by_offset}), sorted({o[1] for o in by_offset})
    if len(by_offset) != len(oys) * len(oxs):
        raise ValueError(f"passes moved by {sorted(by_offset)} are not a lattice (every dy with every dx)")
    rows = [torch.stack([by_offset[(y, x)].features[level] for x in oxs], dim=3) for y in oys]
    fine = rearrange(torch.stack(rows, dim=2), "b h sy w sx d -> b (h sy) (w sx) d").float()
    h, w = fine.shape[1] // len(oys), fine.shape[2] // len(oxs)
    ys = torch.stack([by_offset[(y, oxs[0])].coords[level].view(h, w, 2)[:, 0, 0] for y in oys], 1).flatten()
    xs = torch.stack([by_offset[(oys[0], x)].coords[level].view(h, w, 2)[0, :, 1] for x in oxs], 1).flatten()
    return fine, ys, xs


def rectilinear_at(fine: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear interpolation at ``coords`` (N, 2) of a grid (B, H, W, d) whose rows and columns sit
    at the sorted positions ``ys`` (H,) and ``xs`` (W,), per axis; past the outer points the edge
    value holds. Returns (B, N, d)."""
    c = coords.to(fine.device, torch.float32)
    (y0, y1, ty), (x0, x1, tx) = _bracket(ys.to(c.device), c[:, 0]), _bracket(xs.to(c.device), c[:, 1])
    ty, tx = ty[None, :, None].to(fine.dtype), tx[None, :, None].to(fine.dtype)
    top = fine[:, y0, x0] * (1 - tx) + fine[:, y0, x1] * tx
    bottom = fine[:, y1, x0] * (1 - tx) + fine[:, y1, x1] * tx
    return top * (1 - ty) + bottom * ty


def lattice_bilinear_at(passes: Sequence[MovedPass], level: int, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear interpolation at ``coords`` (N, 2) of K passes moved on a lattice, their cells
    interleaved into one rectilinear grid (``interleave``). Returns (B, N, d)."""
    return rectilinear_at(*interleave(passes, level), coords)


def _bracket(pos: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For sorted positions (M,) and queries (N,): the indices below and above each query and its
    fraction of the way between them, clamped to [0, 1] (the edge value holds past the ends)."""
    hi = torch.searchsorted(pos, q.contiguous()).clamp(1, len(pos) - 1)
    lo = hi - 1
    t = ((q - pos[lo]) / (pos[hi] - pos[lo])).clamp(0, 1)
    return lo, hi, t


def scores(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """R^2 per image (B,) of predictions against the truth at the same points, (B, N, d) each."""
    return metrics.r2(pred, truth)


PREDICTORS = ("student", "nearest", "bilinear", "bilinear_k", "ceiling")


def predictor_scores(lattice_passes: Sequence[MovedPass], moved_by_patch: MovedPass, level: int,
                     truth: torch.Tensor, coords: torch.Tensor) -> dict[str, list[float]]:
    """R^2 per image against one level's ``truth`` (B, N, d) at ``coords`` (N, 2) of the teacher's
    own predictors: ``nearest`` cell and ``bilinear`` from the unmoved pass (the lattice's (0, 0)),
    ``bilinear_k`` from all the lattice passes, and the ``ceiling``: the unmoved grid against the
    pass moved by one patch (``moved_by_patch``), the same pixels one cell apart."""
    grid0 = next(p for p in lattice_passes if p.offset == (0, 0)).features[level]
    preds = {"nearest": nearest_at(grid0, coords), "bilinear": bilinear_at(grid0, coords),
             "bilinear_k": lattice_bilinear_at(lattice_passes, level, coords)}
    res = {k: scores(v, truth).tolist() for k, v in preds.items()}
    a, b = grid0[:, 1:, 1:], moved_by_patch.features[level][:, :-1, :-1]
    res["ceiling"] = scores(a.flatten(1, 2), b.flatten(1, 2)).tolist()
    return res


@torch.no_grad()
def offgrid_scores(module, images: torch.Tensor, levels: Sequence[int], passes: int = 4,
                   offsets: Sequence[tuple[int, int]] = EVAL_OFFSETS) -> dict[str, dict[str, list[float]]]:
    """Per level name and predictor (``PREDICTORS``), R^2 per image against the teacher's own
    features at points off the grid: the cells of passes moved by ``offsets`` px (default 4 and
    11 px off the cells' centres), where no pixel under a cell is mirrored. ``student``: the
    student queried there; ``nearest``, ``bilinear``: from the unmoved pass; ``bilinear_k``: from
    ``passes`` lattice passes (the teacher cost of a fit with ``--passes`` K); ``ceiling``: the
    teacher's own consistency, its grid moved one cell against the image moved one patch."""
    patch, size = module.student.patch_size, images.shape[-1]
    canvas = pad_canvas(images, patch)
    truth_passes = moved_passes(module.targets, canvas, size, offsets)
    on_lattice = lattice_passes(module, images, passes, canvas=canvas)
    moved_by_patch = moved_passes(module.targets, canvas, size, [(patch, patch)])[0]
    out: dict[str, dict[str, list[float]]] = {}
    for lvl in levels:
        feats, coords = stitch(truth_passes, lvl)
        grid = tuple(truth_passes[0].features[lvl].shape[1:3])
        keep = torch.cat([inside(grid, size, size, p.offset, coords.device) for p in truth_passes])
        feats, coords = feats[:, keep], coords[keep]
        student = module.standardizer.decode(lvl, module.student.query(images, lvl, coords).float())
        res = {"student": scores(student, feats).tolist(),
               **predictor_scores(on_lattice, moved_by_patch, lvl, feats, coords)}
        out[module.levels[lvl].name] = res
    return out
