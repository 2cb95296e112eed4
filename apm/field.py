"""A field between the teacher's cells: the student's answer, scaled per level, plus what it missed
at the fitted cells, interpolated (regression-kriging).

A student that sees the pixels around each query (``pixel_window``) knows what varies inside a
cell (an edge, a texture) but, fitted per image from 4 x 256 cells, it is a poor interpolator of
the slowly varying part; bilinear interpolation of K teacher passes is a good interpolator of the
slow part and knows nothing inside a cell. The field route takes both:

    answer_l(p) = g_l * student_l(p) + bilinear_K(r_l)(p),  r_l = z_l - g_l * student_l at the K passes' cells

where z_l are the image's standardized teacher features at the cells of K passes moved on a
lattice (``apm.offgrid``), and the gain g_l in [0, 1] is chosen per level, in closed form, by how
well it predicts held-out cells: the residual of the unmoved pass alone, interpolated bilinearly,
against the other passes' cells. A level the student cannot see (a deep one, for a student whose
heads came from other photographs) gets g near 0, and its answer is bilinear interpolation of the
K passes; a level the pixels decide (block 1 is nearly a function of the 14 x 14 pixels under the
query) gets g near 1, and the residual is small. At the fitted cells the answer is the teacher's.

The student's heads are the prior: a student distilled on many photographs (``solve_field`` in
closed form, or ``apm fit``), not re-solved per image, since a per-image solve from 1024 cells
forgets what the pixels mean. Queries stay independent: the residual lattice is a per-level
function of the coordinates, like a position code.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from einops import rearrange
from torch import nn

from apm import metrics, offgrid
from apm.ridge import ridge_solve

PREFIX = "lattice."


class ResidualLattice(nn.Module):
    """Per fitted level: its gain ``gain_<l>`` (a scalar) and its residuals ``values_<l>`` (1, H, W, d)
    on a rectilinear lattice with rows at ``ys_<l>`` (H,) and columns at ``xs_<l>`` (W,) in [0, 1],
    on the student's standardized scale. Levels without an entry are answered as the student
    answers them."""

    def __init__(self, entries: dict[int, tuple[float | torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.fitted = sorted(entries)
        for lvl, (gain, values, ys, xs) in entries.items():
            self.register_buffer(f"gain_{lvl}", torch.as_tensor(gain, dtype=torch.float32).reshape(()))
            self.register_buffer(f"values_{lvl}", values.float())
            self.register_buffer(f"ys_{lvl}", ys.float())
            self.register_buffer(f"xs_{lvl}", xs.float())

    def forward(self, level: int, pred: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """The field's answer (B, N, d) at ``coords`` (N, 2) or (B, N, 2) from the student's (B, N, d)."""
        if level not in self.fitted:
            return pred
        values, ys, xs = (getattr(self, f"{k}_{level}") for k in ("values", "ys", "xs"))
        res = offgrid.rectilinear_at(values, ys, xs, coords.reshape(-1, 2))  # one image's lattice
        res = res.reshape(*coords.shape[:-1], -1).to(pred.dtype)
        return getattr(self, f"gain_{level}").to(pred.dtype) * pred + res

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], prefix: str = PREFIX) -> "ResidualLattice":
        """Rebuild from the ``prefix``-ed entries of a state dict (a saved fitted student)."""
        levels = {int(k[len(prefix) + 5 :]) for k in state if k.startswith(prefix + "gain_")}
        return cls({l: tuple(state[f"{prefix}{n}_{l}"] for n in ("gain", "values", "ys", "xs")) for l in levels})


def _held_out(target: Sequence[offgrid.MovedPass], base: Sequence[offgrid.MovedPass], level: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """At the cells of every pass but the unmoved one (B, N, d): the targets ``t``, their error
    ``u`` from the unmoved pass's targets interpolated bilinearly, and the same of the student's
    answers ``v``. A field of gain g fitted on the unmoved pass alone errs there by u - g v."""
    i0 = [p.offset for p in target].index((0, 0))
    ts, us, vs = [], [], []
    for i, (t, b) in enumerate(zip(target, base)):
        if i != i0:
            c = t.coords[level]
            ts.append(t.features[level].flatten(1, 2))
            us.append(ts[-1] - offgrid.bilinear_at(target[i0].features[level], c))
            vs.append(b.features[level].flatten(1, 2) - offgrid.bilinear_at(base[i0].features[level], c))
    return torch.cat(ts, 1), torch.cat(us, 1), torch.cat(vs, 1)


def gain(target: Sequence[offgrid.MovedPass], base: Sequence[offgrid.MovedPass], level: int) -> float:
    """The gain in [0, 1] of the student's answers ``base`` that best predicts, with the residual
    of the unmoved pass interpolated bilinearly, the ``target`` cells of the other passes (least
    squares in closed form: the held-out error u - g v is linear in the gain)."""
    _, u, v = (x.double() for x in _held_out(target, base, level))
    den = float(v.square().sum())
    return min(max(float((u * v).sum()) / den, 0.0), 1.0) if den > 0 else 0.0


def heldout_r2(target: Sequence[offgrid.MovedPass], base: Sequence[offgrid.MovedPass], level: int, g: float) -> float:
    """R^2 at the other passes' cells of the field fitted on the unmoved pass alone with gain ``g``:
    an estimate, from the fit's own passes, of how it answers between the cells it was fitted to."""
    t, u, v = _held_out(target, base, level)
    return float(metrics.r2(t - (u - g * v), t)[0])


@dataclass
class FieldFit:
    """One image's field: the lattice to attach to its student, and per level the gain and the
    held-out R^2 (``heldout_r2``)."""

    lattice: ResidualLattice
    gains: dict[int, float]
    heldout: dict[int, float]


@torch.no_grad()
def fit_field(student, image: torch.Tensor, target: Sequence[offgrid.MovedPass], levels: Sequence[int],
              column: torch.Tensor | None = None) -> FieldFit:
    """Fit the field of one image (1, 3, S, S): ``target`` holds its K >= 4 lattice passes of
    standardized teacher features (``offgrid.moved_passes``, the unmoved one among them); the
    ``student`` (any ``Student``; its own lattice, if any, is set aside) answers at their cells.
    ``column``: for a photograph (1, 3, H, W) at its own size and aspect, the student's square
    input its trigger column is read from (``APMStudent.query``)."""
    ask = {} if column is None else {"column": column}
    if len(target) < 4 or (0, 0) not in [p.offset for p in target]:
        raise ValueError(f"the field needs at least 4 passes moved on a lattice, the unmoved one among "
                         f"them; got offsets {[p.offset for p in target]}")
    own, student.lattice = student.lattice, None
    try:
        base = [offgrid.MovedPass(p.offset, [student.query(image, l, p.coords[l], **ask).float().view_as(p.features[l])
                                             if l in levels else None for l in range(len(p.features))], p.coords)
                for p in target]
    finally:
        student.lattice = own
    entries, gains, heldout = {}, {}, {}
    for l in levels:
        g = gain(target, base, l)
        residual = [offgrid.MovedPass(t.offset, [None] * l + [t.features[l] - g * b.features[l]], t.coords)
                    for t, b in zip(target, base)]
        entries[l] = (g, *offgrid.interleave(residual, l))
        gains[l], heldout[l] = g, heldout_r2(target, base, l, g)
    return FieldFit(ResidualLattice(entries), gains, heldout)


class HeadSolve:
    """Each level's head as the ridge regression (``apm.ridge.ridge_solve``, as ``ridge_readout``) of the
    teacher's features on the student's last hidden activations, pooled over many photographs
    without keeping them: per set of activations the sums of h and h h^T, per level those of f and
    h f^T, added batch by batch. Levels whose activations are the same (a student without a level
    code, on one grid) share one set."""

    def __init__(self, ridge: float):
        self.ridge = ridge
        self.hidden: dict[object, list] = {}  # key -> [n, sum h, h h^T]
        self.target: dict[int, tuple[object, list[torch.Tensor]]] = {}  # level -> (key, [sum f, h f^T])

    def add(self, key: object, h: torch.Tensor, feats: dict[int, torch.Tensor]) -> None:
        """Activations (..., k) of some points, and per level its features (..., d) there."""
        h = h.reshape(-1, h.shape[-1]).double()
        self.hidden[key] = _added(self.hidden.get(key), [len(h), h.sum(0), h.T @ h])
        for level, f in feats.items():
            f = f.reshape(-1, f.shape[-1]).double()
            old = self.target.get(level, (key, None))[1]
            self.target[level] = (key, _added(old, [f.sum(0), h.T @ f]))

    def solve(self, level: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's weight (d, k) and bias (d,) on the features' own scale."""
        key, (sf, hf) = self.target[level]
        n, sh, hh = self.hidden[key]
        hm, fm = sh / n, sf / n
        a = ridge_solve(hh - n * torch.outer(hm, hm), hf - n * torch.outer(hm, fm), self.ridge, n)  # centred
        return a.T.float(), (fm - hm @ a).float()


def _added(old: list | None, new: list) -> list:
    return new if old is None else [a + b for a, b in zip(old, new)]


def shared_tables(moved: offgrid.MovedPass) -> list[torch.Tensor]:
    """A pass's cell coordinates per level, one tensor object per grid (the student then does the
    level-free work of a grid's cells once for all its levels)."""
    tables: dict[tuple[int, int], torch.Tensor] = {}
    return [tables.setdefault(tuple(f.shape[1:3]), c) for f, c in zip(moved.features, moved.coords)]


HEADS = ("detail", "features")  # what ``solve_field`` fits the heads to


@torch.no_grad()
def solve_field(module, batches: Iterable[torch.Tensor], passes: int = 4, ridge: float = 1.0,
                progress: Callable[[int], None] | None = None, heads: str = "detail", extra: int = 4,
                seed: int = 0) -> int:
    """Distil ``module``'s student in closed form: keep its body (e.g. fresh and random) and set
    every head to a ridge regression (``HeadSolve``) pooled over every photograph of ``batches``
    ((B, 3, S, S) in [0, 1]), from the teacher's ``passes`` passes moved on a lattice (the frame's
    last pixels mirrored past its edge). The level statistics are set from the unmoved passes.

    ``heads="detail"`` fits what the field route uses of the student: at the cells of ``extra``
    further passes per batch, moved by random sub-patch offsets off the lattice (cells whose
    pixels all lie in the frame), the teacher's features minus their bilinear interpolation from
    the lattice passes, on the same of the student's activations. The heads then answer the detail
    between the cells around the level's mean, not the features themselves. ``"features"``: the
    features at the lattice cells on the activations there. Returns the number of photographs
    used; ``progress`` is called with each batch's."""
    from apm.standardize import LevelStandardizer

    if heads not in HEADS:
        raise ValueError(f"heads must be one of {HEADS}, got {heads!r}")
    student = module.student
    patch = student.patch_size
    levels = list(range(len(module.levels)))
    level_free = getattr(student, "level_dim", 1) == 0
    on_lattice = set(offgrid.lattice(passes, patch))
    off_lattice = [o for o in itertools.product(range(patch), repeat=2) if o not in on_lattice]
    rng = torch.Generator().manual_seed(seed)
    solve, stats, seen = HeadSolve(ridge), LevelStandardizer(module.standardizer.dims), 0
    for images in batches:
        images = images.to(module.device)
        size = images.shape[-1]
        canvas = offgrid.pad_canvas(images, patch)
        lattice = offgrid.lattice_passes(module, images, passes, canvas=canvas)
        stats.update([f.cpu() for f in lattice[0].features])
        groups: dict[object, list[int]] = {}  # levels with the same activations
        for l in levels:
            groups.setdefault(tuple(lattice[0].features[l].shape[1:3]) if level_free else l, []).append(l)
        firsts = [ls[0] for ls in groups.values()]

        def hidden(moved: offgrid.MovedPass) -> list[torch.Tensor]:  # per group (B, n, k)
            tables = shared_tables(moved)
            return student(images, [None] * len(firsts), levels=firsts, hidden=True, points=[tables[l] for l in firsts])

        if heads == "features":
            for p in lattice:
                for (key, ls), h in zip(groups.items(), hidden(p)):
                    solve.add(key, h, {l: rearrange(p.features[l], "b h w d -> b (h w) d") for l in ls})
        else:
            picked = [off_lattice[i] for i in torch.randperm(len(off_lattice), generator=rng)[:extra].tolist()]
            truth = offgrid.moved_passes(module.targets, canvas, size, picked)
            at_lattice = [offgrid.MovedPass(p.offset, [None] * len(levels), p.coords) for p in lattice]
            for p, hs in zip(at_lattice, map(hidden, lattice)):
                for l, h in zip(firsts, hs):
                    p.features[l] = h.view(*h.shape[:1], *lattice[0].features[l].shape[1:3], -1)
            for (key, ls), l0 in zip(groups.items(), firsts):
                h_fine = offgrid.interleave(at_lattice, l0)
                coords = offgrid.stitch(truth, l0)[1]
                grid = tuple(truth[0].features[l0].shape[1:3])
                keep = torch.cat([offgrid.inside(grid, size, size, t.offset, coords.device) for t in truth])
                coords = coords[keep]
                h_off = student(images, [None], levels=[l0], hidden=True, points=[coords])[0]
                dh = h_off - offgrid.rectilinear_at(*h_fine, coords)
                solve.add(key, dh, {l: offgrid.stitch(truth, l)[0][:, keep]
                                    - offgrid.lattice_bilinear_at(lattice, l, coords) for l in ls})
        seen += len(images)
        if progress is not None:
            progress(len(images))
    stats.finalize()
    module.standardizer.load_state_dict(stats.state_dict())
    for l in levels:
        weight, bias = solve.solve(l)
        mean, std = module.standardizer.mean(l), module.standardizer.std(l)
        student.heads[l].weight.copy_(weight / std)
        student.heads[l].bias.copy_((bias - mean) / std if heads == "features" else bias / std)
    return seen
