"""Perceiving a new image: test-time fitting of a student to one image's teacher features.

A distilled student is close to a memory of the images it was fitted to, so the APM paper fits a
student to each new image (its released code: a fresh random student per sample, Adam at 1e-4,
raw MSE on every query, 1200 steps). ``fit_images`` does this for a batch of images at once, each
with its own copy of the student: the copies' parameters are stacked and one ``torch.func.vmap``
runs them all, so a batch gives the same students as one image at a time (every random draw comes
from a generator seeded per image, and Adam is elementwise). An image whose mean R^2 over levels
reaches the target leaves the batch with its weights as they were then.

Recipes (``FitRecipe.protocol``):

- ``ours``: start from the trained student (or a fresh one), AdamW at 1e-3 without warm-up,
  MSE on each level's standardized features (the trained statistics, or the image's own when the
  student has none), ``queries_per_image`` sampled (location, level) queries per step.
- ``official``: the paper's code: a fresh random student, Adam at 1e-4, raw MSE, every query
  every step.

Routes to a fit in few steps (``FitRecipe.moves``, ``solve_heads`` and ``resolve_every``, any
protocol but the official one): move only some of the student's parameters per image (the heads,
a per-image code: the first layer's bias, a shift of the column term, or all but the heads), and/or
set every head to the ridge regression of the image's targets on the student's last hidden
activations, in closed form: first only, or after every gradient step (variable projection).

``Adaptation`` is the inner loop alone; the meta-learning mode of ``APMModule`` (Reptile) runs it
from the shared initialization on every training batch.
"""

from __future__ import annotations

import copy
import inspect
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch
from einops import rearrange
from torch.func import functional_call, vmap
from tqdm.auto import tqdm

from apm import metrics
from apm.errors import ConfigError
from apm.objective import QuerySampler, gather, weighted_mse
from apm.ridge import ridge_solve
from apm.standardize import LevelStandardizer
from apm import offgrid
from teachers.base import Level, seeded, select_levels

PROTOCOLS = ("ours", "official")
INITS = ("trained", "fresh")
# the parameters a per-image fit moves: the student's parts (``Student.parts``) each route moves
MOVES = {"all": ("body", "heads"), "heads": ("heads",), "code": ("code",), "code+heads": ("code", "heads"),
         "body": ("body",)}
ROUTE = ("moves", "solve_heads", "ridge", "resolve_every", "passes", "field")  # the fields that choose the route
# the settings that only a gradient fit reads: asking for one chooses it over the field route
GRADIENT = ("moves", "solve_heads", "resolve_every", "lr", "queries_per_image", "max_steps", "target_r2")


def field_by_default(protocol: str, init: str | None, asked: Sequence[str]) -> bool:
    """Whether a fit that names no route takes the field route, as ``apm perceive`` and
    ``APM.perceive`` do: from a trained student (``init`` trained), with our protocol, unless one
    of the gradient fit's settings (``GRADIENT``, named in ``asked``) was asked for."""
    return protocol == "ours" and init == "trained" and not set(asked) & set(GRADIENT)


@dataclass
class FitRecipe:
    """How a student is fitted to one image.

    Args:
        protocol: ``ours`` or ``official`` (the paper's recipe, see the module docstring).
        init: ``trained`` (start from the given student) or ``fresh`` (a new random student per
            image, seeded by the image's seed); default trained (ours) or fresh (official, which
            is always fresh: ``trained`` with it is an error).
        target_r2: Stop an image when the mean R^2 over levels reaches this.
        max_steps: Stop an image after this many steps whatever its R^2.
        lr: Learning rate; default 1e-3 (ours, AdamW) or 1e-4 (official, Adam).
        queries_per_image: (location, level) queries per step and image, split evenly over
            levels; default the student's training setting (ours). The official recipe queries
            every location: setting it there is an error.
        eval_every: Steps between R^2 checks (the reported step count is a multiple of it).
        eval_at: Further steps at which R^2 is checked (and ``fit_images``' ``on_eval`` called).
        levels: The levels fitted, by index or name; default all. The loss, the R^2 checks and the
            mean R^2 the target applies to cover only these; the other levels are not computed.
        moves: The parameters the gradient steps move per image: ``all``; ``heads`` (each level's
            linear readout); ``code`` (the first layer's bias: a per-image shift of the column
            term, a code of its width); ``code+heads``; ``body`` (all but the heads). The others
            stay the start's, bit for bit.
        solve_heads: First set every fitted level's head to the ridge regression of the image's
            standardized targets on the student's last hidden activations at all the level's
            locations (the rest of the student as it starts): one closed-form step, counted as
            step 1 (R^2 is checked after it).
        ridge: The penalty of ``solve_heads``, relative to the mean squared norm of the centred
            activation rows (``ridge_readout``).
        resolve_every: With ``solve_heads``, solve the heads again after every this many gradient
            steps (0: only first). Every step, with ``moves="body"``: variable projection, the
            gradient steps move the rest of the student under heads that are always optimal.
        passes: Teacher passes per image: 1 fits the teacher's grid; K (a square: 4, 9, 16) also
            runs the teacher on the image moved by a lattice of sub-patch offsets ({0, p/2}^2 px for
            4) and fits the student at the points where those cells truly sit (``apm.offgrid``), so
            it learns the teacher between the grid's cells. The passes count in the fit's seconds.
        field: The field route (``apm.field``): no gradient step; the student is kept as it is (its
            heads, distilled on other photographs, are the prior) and each fitted level gets a gain
            and the bilinear interpolation of what it missed at the ``passes`` passes' cells (4
            unless more are given). At those cells it answers the teacher; between them, the pixels
            it sees and the passes' interpolation together.
    """

    protocol: str = "ours"
    init: str | None = None
    target_r2: float = 0.9
    max_steps: int = 500
    lr: float | None = None
    queries_per_image: int | None = None
    eval_every: int = 10
    eval_at: Sequence[int] = ()
    levels: Sequence[int | str] | None = None
    moves: str = "all"
    solve_heads: bool = False
    ridge: float = 1e-4
    resolve_every: int = 0
    passes: int = 1
    field: bool = False

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"Setting '--protocol': {self.protocol!r} is not one of {', '.join(PROTOCOLS)}.")
        if self.init is not None and self.init not in INITS:
            raise ConfigError(f"Setting '--init': {self.init!r} is not one of {', '.join(INITS)}.")
        if self.max_steps < 0 or self.eval_every < 1:
            raise ConfigError(f"Settings '--max-steps' ({self.max_steps}) and '--eval-every' "
                              f"({self.eval_every}): use max-steps >= 0 and eval-every >= 1.")
        if any(int(s) != s or s < 0 for s in self.eval_at):
            raise ConfigError(f"Setting 'eval_at': {list(self.eval_at)}; give step counts >= 0.")
        if self.moves not in MOVES:
            raise ConfigError(f"Setting '--moves': {self.moves!r} is not one of {', '.join(MOVES)}.")
        if self.resolve_every < 0 or (self.resolve_every and not self.solve_heads):
            raise ConfigError(f"Setting '--resolve-every' ({self.resolve_every}): use a count >= 0, "
                              f"and only with '--solve-heads'.")
        if self.passes < 1 or round(self.passes ** 0.5) ** 2 != self.passes:
            raise ConfigError(f"Setting '--passes': {self.passes}; use a square number of teacher passes "
                              f"(1: the grid alone, 4: moves of {{0, half a patch}}^2, 9, 16).")
        if not self.ridge > 0:
            raise ConfigError(f"Setting '--ridge': {self.ridge}; use a positive penalty (default 1e-4).")
        if self.levels is not None and not len(self.levels):
            raise ConfigError("Setting '--levels' is empty; name at least one level, or leave it "
                              "unset to fit every level.")
        if self.field:
            self._check_field()
        if self.official:  # the paper's code: nothing of ours to start from or to sample with
            ignored = []
            if self.init == "trained":
                ignored.append("'--init trained'")
            if self.queries_per_image is not None:
                ignored.append(f"'--queries {self.queries_per_image}'")
            if self.moves != "all" or self.solve_heads:
                ignored.append(f"'--moves {self.moves}'" if self.moves != "all" else "'--solve-heads'")
            if ignored:
                raise ConfigError(
                    f"Setting '--protocol official' with {' and '.join(ignored)}: the paper's recipe "
                    f"starts every image from a fresh random student and queries every location at "
                    f"every step with every weight, so these would be ignored. Drop them, or use "
                    f"'--protocol ours' (which starts from the checkpoint and samples queries).")
            self.init = "fresh"
        elif self.init is None:
            self.init = "trained"

    def _check_field(self) -> None:
        others = [f for f, on in (("'--protocol official'", self.official), ("'--solve-heads'", self.solve_heads),
                                  (f"'--moves {self.moves}'", self.moves != "all"),
                                  ("'--init fresh'", self.init == "fresh")) if on]
        if others:
            raise ConfigError(f"Setting '--field' with {' and '.join(others)}: the field route takes no "
                              f"gradient step and keeps the trained student's heads as they are (they are "
                              f"what it knows of the pixels), so these do not apply. Drop them, or drop "
                              f"'--field' (docs/field.md).")
        if self.passes == 1:
            self.passes = 4  # the field interpolates between moved passes: {0, p/2}^2 px by default

    def route(self) -> dict[str, Any]:
        """The route settings (``ROUTE``) and their values, as a run log records them."""
        return {k: getattr(self, k) for k in ROUTE}

    def plan(self) -> "Route":
        """The route as the one object the fitting loop asks (``Route``)."""
        return Route(self.moves, self.solve_heads, self.ridge, self.resolve_every)

    @property
    def official(self) -> bool:
        return self.protocol == "official"

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-4 if self.official else 1e-3)

    def optimizer(self, params: Sequence[torch.Tensor], weight_decay: float = 0.0) -> torch.optim.Optimizer:
        if self.official:
            return torch.optim.Adam(params, lr=self.learning_rate())
        return torch.optim.AdamW(params, lr=self.learning_rate(), weight_decay=weight_decay)


@dataclass(frozen=True)
class Route:
    """How a per-image fit moves (``FitRecipe.plan``): which parameters its gradient steps move
    (``moves``), and when every fitted level's head is set in closed form (``solve_heads`` at the
    start, again after every ``resolve_every`` gradient steps; ``ridge`` its penalty). The loop asks
    it at the start and after each step; nothing else reads these fields."""

    moves: str = "all"
    solve_heads: bool = False
    ridge: float = 1e-4
    resolve_every: int = 0

    def moving(self, student: torch.nn.Module, fitted: Sequence[int]) -> list[str]:
        """The names of the parameters the gradient steps move; ConfigError when the student has
        none of them, or no linear head per fitted level to solve."""
        picked = moving_names(student, self.moves)
        names = dict(student.named_parameters())
        if self.solve_heads and not all(f"heads.{i}.weight" in names for i in fitted):
            raise ConfigError(f"Setting '--solve-heads': this {type(student).__name__} has no linear head per "
                              f"level (heads.<level>) to solve; drop '--solve-heads'.")
        return picked

    def start(self, fit: "Adaptation", params: dict[str, torch.Tensor]) -> bool:
        """Step 1: the closed-form solve of the heads, when asked; True when it took the step."""
        if self.solve_heads:
            fit.solve_heads(params, self.ridge)
        return self.solve_heads

    def after_step(self, fit: "Adaptation", params: dict[str, torch.Tensor], step: int) -> None:
        """After gradient step ``step``: the heads solved again every ``resolve_every`` steps."""
        if self.resolve_every and step % self.resolve_every == 0:
            fit.solve_heads(params, self.ridge)


@dataclass
class Fitted:
    """One image's fitted student and its record (``seconds``: the fitting, from the teacher's
    features to the last step; ``teacher_seconds``: the teacher passes run for the batch, 0 when
    its features were given; their sum is the whole fit)."""

    seed: int
    steps: int
    seconds: float
    reached: bool
    r2_before: dict[str, float]
    r2_after: dict[str, float]
    curve: list[tuple[int, float]]
    params: dict[str, torch.Tensor] = field(repr=False)
    stats: list[tuple[torch.Tensor, torch.Tensor]] = field(repr=False)
    teacher_seconds: float = 0.0
    lattice: torch.nn.Module | None = field(default=None, repr=False)
    r2_heldout: dict[str, float] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The JSON-ready part: steps, seconds, whether the target was reached, R^2 per level."""
        mean = lambda d: sum(d.values()) / max(1, len(d))  # noqa: E731
        return {"steps": self.steps, "seconds": round(self.seconds, 4),
                "teacher_seconds": round(self.teacher_seconds, 4), "reached": self.reached,
                "r2_mean_before": mean(self.r2_before), "r2_mean_after": mean(self.r2_after),
                "r2_before": self.r2_before, "r2_after": self.r2_after, "curve": self.curve,
                **({"r2_heldout": self.r2_heldout} if self.r2_heldout else {})}


def moving_names(student: torch.nn.Module, moves: str) -> list[str]:
    """The names of ``student``'s parameters that ``moves`` (a key of ``MOVES``) fits per image;
    ConfigError when the student has none of them."""
    names = [n for n, _ in student.named_parameters()]
    parts = student.parts()
    prefixes = tuple(p for part in MOVES[moves] for p in parts[part])
    picked = [n for n in names if prefixes and n.startswith(prefixes)]
    if not picked:
        groups = ", ".join(sorted({n.split(".")[0] for n in names}))
        raise ConfigError(f"Setting '--moves {moves}': this {type(student).__name__} has no "
                          f"{' or '.join(MOVES[moves])} parameters (its parameters: {groups}). Use "
                          f"'--moves all' or 'heads'.")
    return picked


def ridge_readout(h: torch.Tensor, z: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear readout (weight (..., d, k), bias (..., d)) minimizing ||z - h W^T - b||^2 +
    lam ||W||^2 for activations h (..., n, k) and targets z (..., n, d), lam = ``ridge`` times the
    mean squared norm of the centred rows of h (the bias is not penalized; ``sklearn``'s ``Ridge``
    with ``alpha=lam``). Solved in float64, in the n x n (dual) form when n <= k."""
    h, z = h.double(), z.double()
    hm, zm = h.mean(-2, keepdim=True), z.mean(-2, keepdim=True)
    hc, zc = h - hm, z - zm
    n, k = hc.shape[-2:]
    a = (hc.mT @ ridge_solve(hc @ hc.mT, zc, ridge, n) if n <= k
         else ridge_solve(hc.mT @ hc, hc.mT @ zc, ridge, n))
    return a.mT, (zm - hm @ a).squeeze(-2)


def image_statistics(feats: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per level, each image's own (mean (B, d), std (B,)) from its features (B, h, w, d): the
    standardization of a student that has no statistics from training, computed for each image
    alone by ``LevelStandardizer`` (so a 1x1 level gets mean 0 and its RMS as scale)."""
    per_image = []
    for b in range(len(feats[0])):
        sd = LevelStandardizer([f.shape[-1] for f in feats]).to(feats[0].device)
        sd.update([f[b : b + 1] for f in feats])
        sd.finalize()
        per_image.append(sd)
    return [(torch.stack([sd.mean(i) for sd in per_image]), torch.stack([sd.std(i) for sd in per_image]))
            for i in range(len(feats))]


def fresh_parameters(student: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The parameters of a newly initialized student of the same architecture, seeded; drawn on
    the CPU, so a seed gives the same student whatever device ``student`` is on."""
    with seeded(seed):
        new = copy.deepcopy(student).cpu()
        for m in new.modules():
            if m is not new and hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return {n: p.detach() for n, p in new.named_parameters()}


class Adaptation:
    """The inner loop: per-image copies of ``student`` (parameters stacked on a leading image
    axis) fitted to standardized targets with one vmapped forward and backward per step.

    Args:
        student: The ``APMStudent`` whose architecture (and buffers) the copies share.
        images: (N, 3, H, W) in [0, 1].
        targets: Per level, standardized targets (N, h, w, d).
        weights: Loss weight per level.
        queries_per_image: Queries per image and step, split evenly over levels; None or 0 = all.
        generators: One per image for the query draws (reproducible per image); None = global RNG.
        scales: Per level, the targets' standardization (mean (N, d), std (N,)); ``r2`` then
            scores on the teacher's scale (it matters only for one-location levels, see metrics.r2).
        levels: The student's level indices fitted, default all; ``targets``, ``weights`` and
            ``scales`` then have one entry per fitted level, and the others are never computed.
        points: Per fitted level, the coordinates (P, 2) of its targets when they are points off
            the grid (``apm.offgrid``: the cells of several moved teacher passes, the unmoved
            grid's first); ``targets`` are then (N, P, d). Levels on one grid share one table.
    """

    def __init__(self, student, images: torch.Tensor, targets: Sequence[torch.Tensor],
                 weights: Sequence[float], queries_per_image: int | None,
                 generators: Sequence[torch.Generator] | None = None,
                 scales: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
                 levels: Sequence[int] | None = None, points: Sequence[torch.Tensor] | None = None):
        self.student, self.images, self.generators = student, images, generators
        self.levels = list(range(len(student.levels))) if levels is None else list(levels)
        if not len(targets) == len(weights) == len(self.levels):
            raise ValueError(f"{len(targets)} targets and {len(weights)} weights for {len(self.levels)} levels")
        self.scales = list(scales) if scales is not None else None  # per level (mean (N, d), std (N,))
        self.targets = [rearrange(t, "n h w d -> n (h w) d") if t.ndim == 4 else t for t in targets]
        self.weights = list(weights)
        self.points = None if points is None else list(points)
        sampled = [student.levels[i] for i in self.levels]
        if self.points is not None:  # the sampler draws rows of each level's table of points
            sampled = [Level(l.name, (len(p), 1), l.dim) for l, p in zip(sampled, self.points)]
        self.sampler = QuerySampler(sampled, queries_per_image, student.entry > 0)

    def subset(self, keep: torch.Tensor) -> None:
        """Keep only these images (indices into the current batch)."""
        self.images = self.images[keep]
        self.targets = [t[keep] for t in self.targets]
        if self.scales is not None:
            self.scales = [(m[keep], s[keep]) for m, s in self.scales]
        if self.generators is not None:
            self.generators = [self.generators[i] for i in keep.tolist()]

    def _predict(self, params: dict[str, torch.Tensor], image: torch.Tensor,
                 locs: dict[str, torch.Tensor], hidden: bool = False) -> list[torch.Tensor]:
        one = {k: v[None] for k, v in locs.items()}  # one object per key: levels on a grid share it
        args = (image[None], self.sampler.per_level(one), self.levels)
        kwargs = {"hidden": hidden} if hidden else {}
        if self.points is not None:
            kwargs["points"] = self.points
        return [p[0] for p in functional_call(self.student, params, args, kwargs or None)]

    def loss(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per image (N,): the weighted mean over levels of the MSE at this step's queries."""
        locs = self.sampler.draw(len(self.images), self.images.device, self.generators)
        targets = [gather(t, loc) for t, loc in zip(self.targets, self.sampler.per_level(locs))]

        def one(p, image, tgt, loc):
            return weighted_mse(self._predict(p, image, loc), tgt, self.weights)[0]

        return vmap(one)(params, self.images, targets, locs)

    def step(self, params: dict[str, torch.Tensor], opt: torch.optim.Optimizer) -> torch.Tensor:
        """One optimizer step of every copy; returns the per-image losses (N,)."""
        opt.zero_grad(set_to_none=True)
        loss = self.loss(params)
        loss.sum().backward()  # copies are independent: each gets only its own gradient
        opt.step()
        return loss.detach()

    @torch.no_grad()
    def solve_heads(self, params: dict[str, torch.Tensor], ridge: float) -> None:
        """Set each fitted level's head of every copy, in place, to ``ridge_readout`` of its
        standardized targets on the copy's last hidden activations at all the level's locations."""
        hidden = vmap(lambda p, image: self._predict(p, image, {}, hidden=True))(params, self.images)
        for lvl, h, t in zip(self.levels, hidden, self.targets):
            weight, bias = ridge_readout(h, t, ridge)
            params[f"heads.{lvl}.weight"].copy_(weight)
            params[f"heads.{lvl}.bias"].copy_(bias)

    @torch.no_grad()
    def evaluate(self, params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """R^2 per image and fitted level (N, L) of the dense predictions, and those predictions
        per fitted level (N, h, w, d), both on the teacher's scale (with ``scales``)."""
        preds = vmap(lambda p, image: self._predict(p, image, {}))(params, self.images)
        r2, out = [], []
        for i, (lvl, p, t) in enumerate(zip(self.levels, preds, self.targets)):
            p = p.float()
            if self.scales is not None:
                m, s = self.scales[i]
                p, t = p * s[:, None, None] + m[:, None], t * s[:, None, None] + m[:, None]
            r2.append(metrics.r2(p, t))
            h, w = self.student.levels[lvl].grid
            out.append(rearrange(p[:, : h * w], "n (h w) d -> n h w d", h=h, w=w))  # the unmoved grid
        return torch.stack(r2, dim=1), out

    def r2(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """R^2 per image and fitted level (N, L) of the dense predictions, on the teacher's scale."""
        return self.evaluate(params)[0]


def _stack(per_image: Sequence[dict[str, torch.Tensor]], moving: Sequence[str]) -> dict[str, torch.Tensor]:
    """The per-image parameters stacked on a leading axis; only the ``moving`` ones need grad."""
    return {n: torch.stack([p[n] for p in per_image]).requires_grad_(n in moving) for n in per_image[0]}


def _keep(params: dict[str, torch.Tensor], opt: torch.optim.Optimizer, keep: torch.Tensor
          ) -> tuple[dict[str, torch.Tensor], torch.optim.Optimizer]:
    """The stacked parameters and optimizer state of the kept images only."""
    new = {n: p.detach()[keep].requires_grad_(p.requires_grad) for n, p in params.items()}
    accepted = inspect.signature(type(opt)).parameters
    new_opt = type(opt)([p for p in new.values() if p.requires_grad],
                        **{k: v for k, v in opt.defaults.items() if k in accepted})
    for old_p, new_p in zip(params.values(), new.values()):
        state = opt.state.get(old_p)
        if state:
            new_opt.state[new_p] = {k: (v[keep] if torch.is_tensor(v) and v.ndim and v.shape[0] == old_p.shape[0] else v)
                                    for k, v in state.items()}
    return new, new_opt


def standardized_targets(module, images: torch.Tensor, recipe: FitRecipe,
                         features: Sequence[torch.Tensor] | None = None
                         ) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per level, the images' targets on the scale the student is fitted on, and that scale's
    (mean (N, d), std (N,)): raw for the official recipe, else the student's trained statistics, or
    each image's own when it has none. ``features``: ``module.targets(images)`` if already computed."""
    if features is None:
        with torch.no_grad():
            features = module.targets(images)
    feats = [f.to(images.device).float() for f in features]
    n = images.shape[0]
    if recipe.official:
        stats = [(torch.zeros(n, f.shape[-1], device=f.device), torch.ones(n, device=f.device)) for f in feats]
    elif bool(module.standardizer.ready):
        sd = module.standardizer
        stats = [(sd.mean(i).expand(n, -1), sd.std(i).expand(n)) for i in range(len(feats))]
    else:
        stats = image_statistics(feats)
    z = [(f - m[:, None, None]) / s[:, None, None, None] for f, (m, s) in zip(feats, stats)]
    return z, stats


def fit_images(module, images: torch.Tensor, seeds: Sequence[int], recipe: FitRecipe,
               progress: bool = True, features: Sequence[torch.Tensor] | None = None,
               on_eval: Callable[[int, list[int], torch.Tensor, list[torch.Tensor]], None] | None = None,
               canvas: torch.Tensor | None = None) -> list[Fitted]:
    """Fit one copy of ``module``'s student to each image's teacher features.

    Args:
        module: An ``APMModule`` (trained, or fresh for ``init="fresh"``/``official``).
        images: (N, 3, S, S) in [0, 1] at the module's image size.
        seeds: One per image: its fresh initialization and its query draws.
        recipe: The fitting recipe.
        progress: Show a progress bar over steps.
        features: The images' teacher features when already computed (``module.targets(images)``:
            per level (N, h, w, d) on the teacher's scale); default computed here.
        on_eval: Called at every R^2 check (step 0, every ``eval_every`` steps, the ``eval_at``
            steps and the last) as ``on_eval(step, indices, r2, predictions)``: the indices into
            ``images`` of the images still fitting, their R^2 (n, L) per fitted level, and their
            students' dense predictions per fitted level (n, h, w, d) on the teacher's scale.
        canvas: For ``passes`` > 1: the images with real pixels past their bottom and right edges
            (N, 3, S', S'), the frame at the top left, for the moved passes; default the frame's
            last pixels mirrored (``offgrid.pad_canvas``).

    Returns:
        Per image, a ``Fitted`` (its parameters, statistics, steps, seconds and R^2 per level).
    """
    if len(seeds) != len(images):
        raise ValueError(f"{len(seeds)} seeds for {len(images)} images")
    # Fitting needs autograd even when called under no_grad or inference_mode (tensors made in
    # inference mode cannot be saved for backward: they are cloned out of it).
    with torch.inference_mode(False), torch.enable_grad():
        images = images.clone()
        features = None if features is None else [f.clone() for f in features]
        return _fit(module, images, seeds, recipe, progress, features, on_eval, canvas)


def _start(module, images: torch.Tensor, seeds: Sequence[int], recipe: FitRecipe,
           features: Sequence[torch.Tensor], points: Sequence[torch.Tensor] | None = None
           ) -> tuple[dict[str, torch.Tensor], Adaptation, list]:
    """The stacked starting parameters of every image's copy, the inner loop over the fitted
    levels, and each level's standardization."""
    student, device = module.student, module.device
    z, stats = standardized_targets(module, images, recipe, features)
    fitted = select_levels(module.levels, recipe.levels, "--levels")
    moving = recipe.plan().moving(student, fitted)
    if recipe.init == "fresh":
        init = [fresh_parameters(student, s) for s in seeds]
    else:
        init = [{n: p.detach() for n, p in student.named_parameters()}] * len(seeds)
    params = _stack([{n: p.to(device) for n, p in ps.items()} for ps in init], moving)
    q = (None if recipe.official else
         module.hparams.queries_per_image if recipe.queries_per_image is None else recipe.queries_per_image)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    weights = [1.0] * len(module.levels) if recipe.official else module.loss_weights
    fit = Adaptation(student, images, [z[i] for i in fitted], [weights[i] for i in fitted], q, gens,
                     [stats[i] for i in fitted], fitted, None if points is None else [points[i] for i in fitted])
    return params, fit, stats


def _fit(module, images, seeds, recipe, progress, features, on_eval, canvas=None) -> list[Fitted]:
    device = module.device
    images = images.to(device)
    passes_start = time.perf_counter()
    if recipe.field:
        return _field_fits(module, images, seeds, recipe, features, passes_start, canvas)
    points = None
    if recipe.passes > 1:
        features, points = moved_features(module, images, recipe.passes, features, canvas)
    elif features is None:
        with torch.no_grad():
            features = module.targets(images)
    start = time.perf_counter()  # the fitting, without the teacher (``teacher_seconds``)
    teacher_seconds = start - passes_start
    params, fit, stats = _start(module, images, seeds, recipe, features, points)
    opt = recipe.optimizer([p for p in params.values() if p.requires_grad],
                           0.0 if recipe.official else module.hparams.weight_decay)
    names = [module.student.levels[i].name for i in fit.levels]
    active = list(range(len(images)))
    results: list[Fitted | None] = [None] * len(images)
    curves: list[list[tuple[int, float]]] = [[] for _ in images]
    before, preds = fit.evaluate(params)  # rows stay in the order of ``images``
    eval_at = {int(s) for s in recipe.eval_at} | ({1} if recipe.solve_heads else set())
    bar = tqdm(total=recipe.max_steps, desc="fitting", unit="step", disable=not progress, leave=False)
    step = 0
    while True:
        if step % recipe.eval_every == 0 or step == recipe.max_steps or step in eval_at:
            r2, preds = fit.evaluate(params) if step else (before, preds)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if on_eval is not None:
                on_eval(step, list(active), r2, preds)
            done = []
            for j, i in enumerate(active):
                mean = float(r2[j].mean())
                curves[i].append((step, round(mean, 5)))
                if mean >= recipe.target_r2 or step == recipe.max_steps:
                    results[i] = Fitted(
                        seed=int(seeds[i]), steps=step, seconds=time.perf_counter() - start,
                        reached=mean >= recipe.target_r2, r2_before=dict(zip(names, before[i].tolist())),
                        r2_after=dict(zip(names, r2[j].tolist())), curve=curves[i],
                        params={n: p[j].detach().clone() for n, p in params.items()},
                        stats=[(m[i], s[i]) for m, s in stats], teacher_seconds=teacher_seconds)
                    done.append(j)
            if done:
                keep = torch.tensor([j for j in range(len(active)) if j not in done], dtype=torch.long)
                active = [active[j] for j in keep.tolist()]
                if not active:
                    break
                params, opt = _keep(params, opt, keep.to(device))
                fit.subset(keep.to(device))
            bar.set_postfix(r2=f"{float(r2.mean(1).min()):.3f}", left=len(active))
        _step(fit, params, opt, active, step, recipe)
        step += 1
        bar.update(1)
    bar.close()
    return results  # type: ignore[return-value]


@torch.no_grad()
def _field_fits(module, images, seeds, recipe, features, passes_start: float, canvas=None) -> list[Fitted]:
    """The field route (``apm.field``): per image, the lattice passes standardized as the student
    is, and a ``fit_field`` on them; no gradient step. R^2 after is on the grid's cells (where the
    field answers the teacher); ``r2_heldout`` estimates it between them."""
    from apm.field import fit_field

    passes = offgrid.lattice_passes(module, images, recipe.passes, features, canvas)
    teacher_seconds = time.perf_counter() - passes_start
    _, stats = standardized_targets(module, images, recipe, passes[0].features)
    fitted_levels = select_levels(module.levels, recipe.levels, "--levels")
    names = [module.levels[i].name for i in fitted_levels]
    params = {n: p.detach().clone() for n, p in module.student.named_parameters()}
    out = []
    for b, seed in enumerate(seeds):
        start = time.perf_counter()
        scale = [(m[b], s[b]) for m, s in stats]
        z = [offgrid.MovedPass(p.offset, [(f[b : b + 1] - m) / s for f, (m, s) in zip(p.features, scale)], p.coords)
             for p in passes]
        fit = fit_field(module.student, images[b : b + 1], z, fitted_levels)
        grid = [z[0].features[l] for l in fitted_levels]
        r2, own = [], module.student.lattice
        for lattice in (own, fit.lattice):  # the start, and the field
            module.student.lattice = lattice
            try:
                pred = module.student.dense(images[b : b + 1], fitted_levels)
            finally:
                module.student.lattice = own
            r2.append({n: float(metrics.r2(p.float().flatten(1, 2), t.flatten(1, 2))[0])
                       for n, p, t in zip(names, pred, grid)})
        mean = sum(r2[1].values()) / len(names)
        before = sum(r2[0].values()) / len(names)
        out.append(Fitted(seed=int(seed), steps=1, seconds=time.perf_counter() - start,
                          reached=mean >= recipe.target_r2, r2_before=r2[0], r2_after=r2[1],
                          curve=[(0, round(before, 5)), (1, round(mean, 5))],
                          params=params, stats=scale, teacher_seconds=teacher_seconds, lattice=fit.lattice,
                          r2_heldout={module.levels[l].name: v for l, v in fit.heldout.items()}))
    return out


def moved_features(module, images: torch.Tensor, passes: int,
                   features: Sequence[torch.Tensor] | None = None, canvas: torch.Tensor | None = None
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per level, the targets of ``offgrid.lattice_passes`` stitched into points (N, P, 1, d), and their
    coordinates (P, 2), one table object per grid."""
    passes_ = offgrid.lattice_passes(module, images, passes, features, canvas)
    tables: dict[tuple[int, int], torch.Tensor] = {}
    feats, points = [], []
    for lvl, f in enumerate(passes_[0].features):
        feat, table = offgrid.stitch(passes_, lvl)
        feats.append(feat[:, :, None])  # (N, P, 1, d): a grid of P x 1 to the rest of the fit
        points.append(tables.setdefault(tuple(f.shape[1:3]), table))
    return feats, points


def _step(fit: Adaptation, params, opt, active: list[int], step: int, recipe: FitRecipe) -> None:
    route = recipe.plan()
    if step == 0 and route.start(fit, params):
        return
    losses = fit.step(params, opt)
    if not torch.isfinite(losses).all():
        bad = [active[j] for j in (~torch.isfinite(losses)).nonzero().flatten().tolist()]
        raise ConfigError(f"Fitting diverged (loss not finite) for image(s) {bad} at step {step + 1}; "
                          f"lower '--lr' (now {recipe.learning_rate():g}).")
    route.after_step(fit, params, step)


def fitted_module(module, fitted: Fitted):
    """A copy of ``module`` (sharing its frozen teacher) holding ``fitted``'s student and the
    statistics it was fitted with, in eval mode: usable by every ``apm`` tool and savable."""
    clone = copy.deepcopy(module, memo={id(module.teacher): module.teacher})
    clone.student.load_state_dict({n: p.to(clone.device) for n, p in fitted.params.items()})
    clone.student.lattice = None if fitted.lattice is None else copy.deepcopy(fitted.lattice).to(clone.device)
    sd = clone.standardizer
    for i, (mean, std) in enumerate(fitted.stats):
        sd.mean(i).copy_(mean)
        sd.std(i).copy_(std)
    sd.ready.fill_(True)
    return clone.eval()


def perceive_images(module, images: torch.Tensor, seeds: Sequence[int], recipe: FitRecipe,
                    progress: bool = True, features: Sequence[torch.Tensor] | None = None,
                    ) -> list[tuple[Any, Any, dict[str, Any]]]:
    """Fit ``images`` (N, 3, S, S) with ``fit_images`` (``features`` as there); per image,
    ``(before, after, record)``: the student it started from and the fitted one (modules in eval
    mode, each with the statistics it was fitted with) and the JSON-ready record (protocol, init,
    seed, steps, seconds, R^2 per level)."""
    out = []
    for fitted in fit_images(module, images, seeds, recipe, progress, features=features):
        start = (fresh_parameters(module.student, fitted.seed) if recipe.init == "fresh" else
                 {n: p.detach() for n, p in module.student.named_parameters()})
        before = fitted_module(module, replace(fitted, params=start, lattice=None))
        rec = {"protocol": recipe.protocol, "init": recipe.init, "lr": recipe.learning_rate(), **recipe.route(),
               "target_r2": recipe.target_r2, "seed": fitted.seed, **fitted.record()}
        out.append((before, fitted_module(module, fitted), rec))
    return out

