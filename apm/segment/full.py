"""Islands at the photograph's own pixels (``apm segment --resolution full``), scored as the BSDS500
benchmark scores: on the whole, uncropped photograph against the uncropped ground truth, with the
region measures and the boundary measure.

The teacher sees the whole photograph at its aspect ratio, each side resized to the nearest multiple
of its patch (481x321 -> 476x322 for a 14-px patch). A source of features is a callable
``features_at(coords) -> (N, d)`` answering at continuous coordinates (y, x) in [0, 1] (the
student's frame: cell (i, j) of an (h, w) grid is centred at ((i + 0.5) / h, (j + 0.5) / w)); the
photograph's pixel (r, c) of (H, W) is queried at ((r + 0.5) / H, (c + 0.5) / W). Sources:

- ``teacher_bilinear``: each level's grid upsampled bilinearly (``grid_features_at``);
- ``colour``: the mean colours of the teacher's patches, upsampled bilinearly;
- a student queried at every pixel: any ``features_at(image, level, coords)`` (``Plan.features_at``,
  e.g. a field that sees the pixels); by default the module's own student (``student_query``), or
  with ``--perceive`` a copy fitted to each photograph first (``fitted_query``);
- ``ucm``: gPb-owt-ucm's segmentations (``--ucm DIR``), the benchmark's own segmenter.

k-means islands are fitted on a sample of pixels and every pixel is then labelled in chunks
(``pixel_islands``), so memory stays bounded at any size. The boundary strength of a source is the
share of its islands maps (over k and levels) that put a boundary at a pixel (``hierarchy_strength``);
its thresholds give boundary ODS/OIS as the benchmark takes them.
"""

from __future__ import annotations

import inspect
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from apm.segment import boundaries as B
from apm.segment.measures import MEASURES, ods_ois
from apm.segment.truth import Truth

FeaturesAt = Callable[[torch.Tensor], torch.Tensor]  # coords (N, 2) -> features (N, d)


def teacher_size(hw: tuple[int, int], patch: int) -> tuple[int, int]:
    """Each side rounded to the nearest multiple of ``patch`` (at least one patch)."""
    return tuple(max(patch, int(round(s / patch)) * patch) for s in hw)


def pixel_coords(hw: tuple[int, int], start: int = 0, stop: int | None = None) -> torch.Tensor:
    """(N, 2) coordinates (y, x) in [0, 1] of the centres of pixels ``start:stop`` (row-major) of
    an (H, W) photograph."""
    H, W = hw
    idx = torch.arange(start, H * W if stop is None else min(stop, H * W))
    return torch.stack([(idx // W + 0.5) / H, (idx % W + 0.5) / W], 1)


def grid_features_at(grid: torch.Tensor) -> FeaturesAt:
    """Bilinear interpolation of grid features (h, w, d) at coordinates (N, 2) in [0, 1] (cell
    centres at (i + 0.5) / h; beyond the outer centres the border value, as ``F.interpolate``)."""
    g = rearrange(grid.float(), "h w d -> 1 d h w")

    def at(coords: torch.Tensor) -> torch.Tensor:
        xy = (coords.flip(-1).float() * 2 - 1).to(g.device)[None, :, None]  # grid_sample wants (x, y)
        out = F.grid_sample(g, xy, mode="bilinear", padding_mode="border", align_corners=False)
        return rearrange(out, "1 d n 1 -> n d")
    return at


def student_query(module, chunk: int = 16384) -> Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]:
    """``features_at(image, level, coords)`` of the module's student (teacher's scale): the whole
    photograph resized to the student's square input, queried at ``coords`` in chunks. The place
    where a student that sees the pixels at each query plugs in instead."""
    @torch.no_grad()
    def at(image: torch.Tensor, level: int, coords: torch.Tensor) -> torch.Tensor:
        pred = module.student.query(square(module, image), level, coords.to(module.device), chunk)
        return module.standardizer.decode(level, pred.float())[0].cpu()
    return at


def square(module, image: torch.Tensor) -> torch.Tensor:
    """The photograph (3, H, W) resized to the student's square input: (1, 3, S, S) on its device."""
    size = int(module.hparams.image_size)
    return F.interpolate(image[None].float(), size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False).clamp(0, 1).to(module.device)


def fitted_query(module, recipe, chunk: int = 16384) -> Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]:
    """``features_at`` of a copy of the student fitted to each photograph first (``--perceive``
    with a gradient route): the photograph resized to the student's input, fitted once by
    ``recipe``, then queried as ``student_query`` queries. The field route is fitted at the
    photograph's own size instead (``field_query``)."""
    from apm.perceive import fit_images, fitted_module

    held: dict = {}

    def at(image: torch.Tensor, level: int, coords: torch.Tensor) -> torch.Tensor:
        if held.get("image") is not image:
            fitted = fit_images(module, square(module, image), [0], recipe, progress=False)[0]
            held.update(image=image, query=student_query(fitted_module(module, fitted), chunk))
        return held["query"](image, level, coords)
    return at


def field_query(module, passes: int = 4, chunk: int = 16384) -> Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]:
    """``features_at`` of the field route (``apm.field``) fitted at the photograph's own size and
    aspect: the teacher's ``passes`` lattice passes on the whole photograph (``teacher_input``, each
    side a multiple of its patch), the student answering at their cells with the pixels around
    each cell read from that photograph and its trigger column from the photograph resized to its
    square input (``APMStudent.query(column=...)``); fitted once per photograph and level."""
    from apm import offgrid
    from apm.errors import ConfigError
    from apm.field import fit_field

    student, sd = module.student, module.standardizer
    if "column" not in inspect.signature(student.query).parameters:
        raise ConfigError(f"The field route at full resolution needs a student that reads its trigger column "
                          f"and the pixels around a query from different inputs (the APM student); "
                          f"{type(student).__name__} does not: use --resolution grid, or --no-field.")
    held: dict = {}

    @torch.no_grad()
    def at(image: torch.Tensor, level: int, coords: torch.Tensor) -> torch.Tensor:
        if held.get("image") is not image:
            x, moved = photograph_passes(module, image, passes)
            z = [offgrid.MovedPass(p.offset, [sd.encode(l, f) for l, f in enumerate(p.features)], p.coords)
                 for p in moved]
            held.clear()
            held.update(image=image, x=x, column=square(module, image), passes=z, lattices={})
        lattices = held["lattices"]
        if level not in lattices:
            lattices[level] = fit_field(student, held["x"], held["passes"], [level], column=held["column"]).lattice
        own, student.lattice = student.lattice, lattices[level]
        try:
            pred = student.query(held["x"], level, coords.to(module.device), chunk, column=held["column"])
        finally:
            student.lattice = own
        return sd.decode(level, pred.float())[0].cpu()
    return at


def teacher_input(module, image: torch.Tensor) -> torch.Tensor:
    """The whole photograph (3, H, W) as the teacher sees it at full resolution: (1, 3, H', W') on
    the module's device, each side resized to the nearest multiple of the teacher's patch."""
    patch = int(getattr(module.teacher, "patch_size", module.student.patch_size))
    return F.interpolate(image[None].float(), size=teacher_size(image.shape[-2:], patch), mode="bilinear",
                         antialias=True, align_corners=False).clamp(0, 1).to(module.device)


@torch.no_grad()
def photograph_passes(module, image: torch.Tensor, passes: int):
    """The whole photograph as the teacher sees it (``teacher_input``) and the teacher's ``passes``
    passes on it moved on a lattice (``offgrid.lattice_passes``), or the one-paragraph error of a
    teacher that does not take it."""
    from apm import offgrid

    x = teacher_input(module, image)
    try:
        return x, offgrid.lattice_passes(module, x, passes)
    except (AttributeError, RuntimeError, ValueError, AssertionError) as e:
        raise _teacher_refused(module, x, e) from None


def _teacher_refused(module, x: torch.Tensor, e: Exception):
    from apm.errors import ConfigError

    return ConfigError(f"Setting '--resolution full': the teacher {type(module.teacher).__name__} did not take "
                       f"the whole photograph at {tuple(x.shape[-2:])} px ({type(e).__name__}: {str(e)[:120]}); "
                       f"use --resolution grid, or a teacher that takes any input size (DINOv2, timm ViTs "
                       f"with dynamic image size).")


@torch.no_grad()
def teacher_grids(module, image: torch.Tensor, levels: Sequence[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The teacher's features (h, w, d) of ``levels`` on the whole photograph (3, H, W) at its
    aspect ratio, and the patch colours (h, w, 3) of the same input."""
    teacher = module.teacher
    x = teacher_input(module, image)
    try:
        feats = [f.float()[0].cpu() for f in teacher.extract(x)]
    except (AttributeError, RuntimeError, ValueError, AssertionError) as e:
        raise _teacher_refused(module, x, e) from None
    names = [l.name for l in module.levels]
    by_name = {l.name: f for l, f in zip(teacher.levels, feats)}
    patch = int(getattr(teacher, "patch_size", module.student.patch_size))
    colours = rearrange(F.avg_pool2d(x, patch)[0].cpu(), "c h w -> h w c")
    return [colours if names[i] == "rgb" else by_name[names[i]] for i in levels], colours


@torch.no_grad()
def teacher_lattice(module, image: torch.Tensor, levels: Sequence[int], passes: int) -> list[FeaturesAt]:
    """Per level of ``levels``, bilinear interpolation of the teacher's ``passes`` passes on the
    whole photograph moved on a lattice of sub-patch offsets (``offgrid.lattice``; its last pixels
    mirrored past the edge): the teacher's cost of a field fitted on the same passes, or with
    many passes (49: every 2 px) nearly the teacher at every pixel."""
    from apm import offgrid

    moved = photograph_passes(module, image, passes)[1]
    out = []
    for lvl in levels:
        fine, ys, xs = offgrid.interleave(moved, lvl)
        out.append(lambda c, g=fine.cpu(), ys=ys.cpu(), xs=xs.cpu(): offgrid.rectilinear_at(g, ys, xs, c)[0])
    return out


def pixel_islands(features_at: FeaturesAt, hw: tuple[int, int], ks: Sequence[int], seed: int = 0,
                  n_init: int = 3, sample: int = 20000, chunk: int = 65536) -> dict[int, np.ndarray]:
    """k-means label maps (H, W) of the features at every pixel, per k: fitted on ``sample``
    pixels drawn at random (seeded), then every pixel labelled by its nearest centre, ``chunk``
    pixels at a time."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    n = hw[0] * hw[1]
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(n, min(n, sample), replace=False))
    coords = pixel_coords(hw)[torch.from_numpy(picked)]
    pts = features_at(coords).numpy().astype(np.float32)
    distinct = len(np.unique(pts, axis=0))
    models = {}
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning on near-duplicate points
        for k in ks:
            models[int(k)] = KMeans(max(1, min(int(k), distinct)), n_init=n_init, random_state=seed).fit(pts)
    out = {k: np.empty(n, np.int64) for k in models}
    for start in range(0, n, chunk):
        f = features_at(pixel_coords(hw, start, start + chunk)).numpy().astype(np.float32)
        for k, km in models.items():
            out[k][start:start + len(f)] = km.predict(f)
    return {k: v.reshape(hw) for k, v in out.items()}


def hierarchy_strength(maps: Sequence[np.ndarray]) -> np.ndarray:
    """Boundary strength in [0, 1] at each pixel: the share of the label maps (islands over k and
    levels) whose boundary (``seg2bdry``) passes there."""
    return np.mean([B.seg2bdry(m) for m in maps], axis=0)


def contour_strength(features_at: Sequence[FeaturesAt], hw: tuple[int, int], band: int = 64,
                     chunk: int = 65536) -> np.ndarray:
    """Boundary strength in [0, 1] at each pixel from how fast the features turn: per source of
    ``features_at`` (e.g. levels), the magnitude of the spatial gradient (central differences, one-
    sided at the edges, as ``np.gradient``) of the unit-length features at every pixel, divided by
    its 99th percentile and clipped to 1, then the mean over the sources. Rows go ``band`` at a
    time (with one row either side), so memory follows the band, not the photograph."""
    H, W = hw
    out = np.zeros((len(features_at), H, W), np.float32)
    for i, at in enumerate(features_at):
        for top in range(0, H, band):
            lo, hi = max(0, top - 1), min(H, top + band + 1)
            coords = pixel_coords(hw, lo * W, hi * W)
            f = torch.cat([at(c) for c in coords.split(chunk)]).reshape(hi - lo, W, -1).numpy()
            f = f / (np.linalg.norm(f, axis=-1, keepdims=True) + 1e-6)
            gy, gx = np.gradient(f, axis=(0, 1)) if hi - lo > 1 else (np.zeros_like(f), np.gradient(f, axis=1))
            g = np.sqrt((gy ** 2 + gx ** 2).sum(-1))
            out[i, top : min(H, top + band)] = g[top - lo : top - lo + min(band, H - top)]
        scale = np.percentile(out[i], 99)
        out[i] = np.clip(out[i] / scale, 0, 1) if scale > 0 else 0
    return out.mean(0)


@dataclass
class FullPlan:
    """What ``score_full_image`` measures.

    Args:
        levels: The module's level indices scored.
        ks: k-means cluster counts (ODS/OIS choose among them).
        seed: Seed of k-means and of its pixel sample.
        n_init: k-means++ starts.
        sample: Pixels k-means is fitted on (every pixel is then labelled).
        thresholds: Thresholds of each boundary strength map and of gPb-owt-ucm's ``ucm2``.
        features_at: A student queried at any coordinate, ``features_at(image, level, coords)``
            -> (N, d) on the teacher's scale, scored as ``student_name``; None: no student.
        student_name: The name of its rows.
        teacher_passes: Sources of the teacher itself: 1 is its grid upsampled bilinearly
            (``teacher_bilinear``), K > 1 bilinear interpolation of K passes moved on a lattice
            (``teacher_k<K>``: 4 is a field's teacher cost, 49 the teacher every 2 px).
        colour: Also k-means of the patch colours.
        boundaries: Also the boundary measure (the slow part: a matching per threshold and annotator).
        contours: Also, per source of features, the boundaries where its features turn fast
            (``contour_strength`` over the levels; rows ``<source>:contours``), beside its islands'.
        links: None: boundary pixels matched by a largest matching (exact, 4-5 times faster); a
            seed: the benchmark's random outlier links (``boundaries.correspond``), whose matchings
            leave about 0.1% of the pairs unmatched.
    """

    levels: list[int]
    ks: list[int]
    seed: int = 0
    n_init: int = 3
    sample: int = 20000
    thresholds: int = 15
    features_at: Callable | None = None
    student_name: str = "student_queried"
    boundaries: bool = True
    links: int | None = None
    chunk: int = 65536
    teacher_passes: tuple[int, ...] = (1,)
    colour: bool = True
    contours: bool = False


def _sources(module, image: torch.Tensor, plan: FullPlan) -> dict[str, dict[str, FeaturesAt]]:
    """Per source and level name, the features at any coordinate of one photograph."""
    grids, colours = teacher_grids(module, image, plan.levels)
    names = [module.levels[i].name for i in plan.levels]
    out = {}
    for k in plan.teacher_passes:
        at = ([grid_features_at(g) for g in grids] if k == 1 else teacher_lattice(module, image, plan.levels, k))
        out["teacher_bilinear" if k == 1 else f"teacher_k{k}"] = dict(zip(names, at))
    if plan.colour:
        out["colour"] = {"patch colours": grid_features_at(colours)}
    if plan.features_at is not None:
        out[plan.student_name] = {n: (lambda c, lvl=i: plan.features_at(image, lvl, c))
                                  for n, i in zip(names, plan.levels)}
    return out


def score_full_image(module, name: str, image: torch.Tensor, truth: Truth, plan: FullPlan,
                     ucm2: np.ndarray | None = None) -> dict:
    """One photograph (3, H, W) against its uncropped ground truth: per source, level and k the
    region measures (``scores``); per source the boundary counts of its islands' hierarchy
    (``boundary``); gPb-owt-ucm at each threshold when ``ucm2`` is given; seconds."""
    from apm.segment.ucm import ucm_regions, ucm_strength

    start, cpu = time.perf_counter(), time.process_time()
    hw = tuple(image.shape[-2:])
    people = [B.thin(B.seg2bdry(m)) for m in truth.maps]
    thr = B.thresholds(plan.thresholds)
    scores, boundary = {}, {}
    for source, levels in _sources(module, image, plan).items():
        maps = {n: pixel_islands(f, hw, plan.ks, plan.seed, plan.n_init, plan.sample, plan.chunk)
                for n, f in levels.items()}
        scores[source] = {n: {k: truth.score(m) for k, m in lv.items()} for n, lv in maps.items()}
        if plan.boundaries:
            strength = hierarchy_strength([m for lv in maps.values() for m in lv.values()])
            boundary[source] = B.strength_counts(strength, people, thr, rng=plan.links)
            if plan.contours and source != "colour":
                strength = contour_strength(list(levels.values()), hw, chunk=plan.chunk)
                boundary[f"{source}:contours"] = B.strength_counts(strength, people, thr, rng=plan.links)
    if ucm2 is not None:
        scores["ucm"] = {"gPb-owt-ucm": {float(t): truth.score(ucm_regions(ucm2, t)) for t in thr}}
        if plan.boundaries:
            boundary["ucm"] = B.strength_counts(ucm_strength(ucm2), people, thr, rng=plan.links)
    return {"name": name, "scores": scores, "boundary": boundary, "annotators": len(truth.maps),
            "weight": float(len(truth.maps) * truth.maps[0].size), "hw": list(hw),
            "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu}


def summarize_full(results: Sequence[dict]) -> dict:
    """Region ODS/OIS per source and level, boundary ODS/OIS/AP per source, over the photographs."""
    w = [r["weight"] for r in results]
    first = results[0]
    regions = {s: {n: ods_ois([r["scores"][s][n] for r in results], w) for n in lv}
               for s, lv in first["scores"].items()}
    bounds = {s: B.collect([r["boundary"][s] for r in results]) for s in first["boundary"]}
    for b in bounds.values():
        b.pop("images")
    return {"regions": regions, "boundaries": bounds, "images": len(results)}


def format_full(summary: dict) -> str:
    """The full-resolution summary as text tables."""
    head = "".join(f"{m + ' ODS OIS':>18}" for m in MEASURES)
    lines = ["full resolution (whole photographs, uncropped ground truth). covering, pri, ari: higher is "
             "better; vi (bits): lower is better. ODS: one k (or threshold) for every photograph, OIS: the "
             "best per photograph.", f"  {'source':<18}{'level':<16}{head}"]
    for s, lv in summary["regions"].items():
        for n, v in lv.items():
            lines.append(f"  {s:<18}{n:<16}" + "".join(f"{v[m]['ods']:>10.3f} {v[m]['ois']:.3f}" for m in MEASURES))
    if summary["boundaries"]:
        lines.append("boundaries (higher is better; islands: the share of maps over k and levels with a "
                     "boundary there): F ODS (recall, precision) / F OIS / AP")
        for s, b in summary["boundaries"].items():
            o = b["ods"]
            lines.append(f"  {s:<26}{o['f']:>8.3f} ({o['recall']:.3f}, {o['precision']:.3f}) "
                         f"{b['ois']['f']:>8.3f} {b['ap']:>8.3f}")
    return "\n".join(lines)


def run_full(module, images: Sequence[str], gt: str | Path, plan: FullPlan, ucm: str | Path | None = None,
             limit: int | None = None, cpu_seconds: float | None = None) -> tuple[list[dict], list[str]]:
    """Every photograph of ``images`` (the first ``limit``; none started after ``cpu_seconds`` of
    this process's CPU time, the fair budget on a shared machine) with
    ground truth in ``gt`` (and a ``<name>.mat`` in ``ucm`` when given) scored at full resolution,
    a line printed per photograph; the results and the skipped inputs (each named in a warning)."""
    from apm.errors import ConfigError
    from apm.segment.run import load_photos
    from apm.segment.truth import BadGroundTruth, find_truth, read_truth
    from apm.segment.ucm import read_ucm2

    photos, skipped = load_photos(images, 0)
    if not Path(gt).is_dir():
        raise ConfigError(f"Setting '--gt': {str(gt)!r} is not a folder of ground truth.")
    found, results, start = find_truth(gt), [], time.process_time()
    todo = photos[:limit] if limit else photos
    for i, (name, image, hw) in enumerate(todo, 1):
        if cpu_seconds is not None and time.process_time() - start > cpu_seconds:
            break
        try:
            if name not in found:
                raise BadGroundTruth(f"{name}: no ground truth in {gt}")
            truth = Truth(name, found[name], read_truth(found[name], hw))
            ucm2 = read_ucm2(Path(ucm) / f"{name}.mat", hw) if ucm else None
        except (BadGroundTruth, FileNotFoundError) as e:
            warnings.warn(f"skipped: {e}", stacklevel=2)
            skipped.append(str(e))
            continue
        results.append(score_full_image(module, name, image, truth, plan, ucm2))
        print(f"[{i}/{len(todo)}] {name} ({hw[0]}x{hw[1]}): {results[-1]['seconds']:.1f} s", flush=True)
    if not results:
        raise ConfigError(f"No photograph of {list(images)} has usable ground truth in {gt} (see the warnings).")
    return results, skipped
