"""The LightningModule: distill a frozen teacher's per-level features into an APM student."""

from __future__ import annotations

import logging
import math
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from apm import metrics, offgrid
from apm.cache import teacher_fingerprint
from apm.checkpoints import check_compatible
from apm.data import batch_images
from apm.errors import ConfigError
from apm.nonfinite import NonFiniteGuard
from apm.meta import reptile_step
from apm.objective import QuerySampler, gather, warmup_cosine, weighted_mse
from apm.standardize import LevelStandardizer
from apm.targets import TeacherTargets
from apm.glom import GLOMStudent, glom_settings
from apm.student import LEVEL_ENTRIES, RGB, APMStudent
from teachers import Level
from teachers.base import TEACHER_PRECISIONS, check_image_size, select_levels
from teachers.multi import DEFAULT_TEACHER, build_teacher

# Settings whose default changed, with the value a checkpoint written before them was trained with:
# the positional code's top frequency before it followed the grid, and where the level code
# entered before that was a setting.
LEGACY_DEFAULTS = {"pe_max_freq": 64.0, "level_entry": "first"}
DEFAULT_LEVEL_ENTRY = "late"
STUDENTS = ("apm", "glom")
log = logging.getLogger(__name__)


def check_settings(hp: Any) -> None:
    """ConfigError naming the setting, for values the student or the loop cannot take."""
    if hp.column_filters < 1:
        raise ConfigError(f"Setting 'model.column_filters': {hp.column_filters}; use 1 (the paper's "
                          f"single filter) or more.")
    if hp.get("pixel_window", 0) < 0 or not hp.get("pixel_spacing", 1.0) > 0:
        raise ConfigError(f"Settings 'model.pixel_window' ({hp.pixel_window}) and 'model.pixel_spacing' "
                          f"({hp.pixel_spacing}): use a window of 0 (off) or more samples a side, "
                          f"spaced by a positive number of pixels (e.g. 14 and 1).")
    if hp.get("subpatch_moves") and hp.feature_cache:
        raise ConfigError("Settings 'model.subpatch_moves' and 'model.feature_cache': the cache holds the "
                          "teacher's features of the unmoved photographs, and moved ones differ at every "
                          "step; unset one of them.")
    if hp.meta_inner_steps < 0:
        raise ConfigError(f"Setting 'model.meta_inner_steps': {hp.meta_inner_steps}; use 0 (plain "
                          f"distillation) or the number of inner fitting steps per image (e.g. 5).")
    if hp.meta_inner_steps and hp.compile:
        raise ConfigError("Settings 'model.meta_inner_steps' and 'model.compile': the meta-learning "
                          "inner loop runs the student through torch.func.vmap, which a compiled "
                          "student does not support; unset one of them.")
    if str(hp.teacher_precision) not in TEACHER_PRECISIONS:
        raise ConfigError(f"Setting 'model.teacher_precision': {hp.teacher_precision!r} is not one of "
                          f"{', '.join(TEACHER_PRECISIONS)}; 32 (the default) keeps the targets "
                          f"independent of trainer.precision.")
    if hp.level_entry not in LEVEL_ENTRIES:
        raise ConfigError(f"Setting 'model.level_entry': {hp.level_entry!r} is not one of "
                          f"{', '.join(LEVEL_ENTRIES)}.")
    check_student_settings(hp)


def check_student_settings(hp: Any) -> None:
    """ConfigError naming ``model.student`` or ``model.glom`` for values they cannot take."""
    student = hp.get("student", "apm")
    if student not in STUDENTS:
        raise ConfigError(f"Setting 'model.student': {student!r} is not one of {', '.join(STUDENTS)}.")
    if hp.get("glom") is not None and student != "glom":
        raise ConfigError("Setting 'model.glom' is given but 'model.student' is 'apm'; set "
                          "'model.student: glom' (or drop 'model.glom').")
    if student == "glom":
        try:
            glom_settings(hp.get("glom"))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"Setting 'model.glom': {e}.") from None


def level_loss_weights(names: Sequence[str], rgb_weight: float,
                       level_weights: dict[str, float] | None) -> list[float]:
    """The loss weight of each level: ``level_weights`` by name (default 1), ``rgb_weight`` for
    the ``rgb`` level; ConfigError for a name that is not a level."""
    weights = level_weights or {}
    if RGB in weights:
        raise ConfigError(
            f"Setting 'model.level_weights': the {RGB!r} level is weighted by 'model.rgb_weight' "
            f"(now {rgb_weight:g}); move {RGB}: {weights[RGB]} there.")
    unknown = set(weights) - set(names)
    if unknown:
        raise ConfigError(f"Setting 'model.level_weights': {sorted(unknown)} are not levels of this "
                          f"run; the levels are {', '.join(names)}.")
    return [rgb_weight if n == RGB else weights.get(n, 1.0) for n in names]


class APMModule(L.LightningModule):
    """Distill a frozen teacher (or several) into an APM student, per (location, level).

    Args:
        teacher: Registered teacher name (see ``teachers.list_teachers()``), or
            ``"your.module:name"`` for a teacher defined in your own module. Default (null):
            ``dinov2_small``, unless ``teachers`` is given.
        teacher_args: Keyword arguments of the teacher's factory (``pretrained``, ``levels``, ...).
        teachers: Several teachers distilled into one student, instead of ``teacher`` and
            ``teacher_args`` (leave those null): a list of ``{name, args, image_size, alias}``, the
            registered name, the factory's arguments, the side the image is resized to for that
            teacher (default ``data.image_size``) and the prefix of its level names (default the
            name): levels are named ``<alias>/<level>``, e.g. ``dinov2_small/block12``. See
            configs/agglomerative.yaml and docs/multi_teacher.md.
        teacher_precision: Precision of the frozen teacher's forward: ``32`` (default) computes the
            targets, level statistics and cached features in fp32 whatever ``trainer.precision``
            is; ``bf16`` or ``16`` run the teacher under autocast, faster, at about 0.4-0.6%
            relative error per level (DINOv2-base, see docs/benchmarks.md).
        image_size: Input side in pixels (linked from ``data.image_size``).
        patch_size: Kernel and stride of the student's column filter; default the teacher's patch
            (with ``teachers``: ``image_size`` over the first teacher's grid side).
        hidden_dims: Widths of the shared field MLP's layers.
        column_filters: Output channels of the column filter; 1 (default) is the paper's single
            filter, one number per patch. More let an unseen image's patch colours and textures
            through (see docs/perceive.md).
        pixel_window: Evidence at the query point: each query also sees the photograph's pixels on
            a ``pixel_window`` x ``pixel_window`` lattice around its own coordinate, sampled
            bilinearly, beside the trigger column; 0 (default) is the paper's query. With 14 (and
            ``pixel_spacing`` 1) a query sees one patch's worth of pixels wherever it lands, so the
            student answers between the teacher's cells (docs/field.md).
        pixel_spacing: Pixels between the window's samples.
        subpatch_moves: Distill toward the teacher run on each photograph moved by a random
            sub-patch offset (0 to patch-1 pixels down and right), its cells queried where they truly
            sit: the student learns the teacher between the grid's cells, not only at them. Not
            with ``feature_cache``.
        pe_dim: Width of the 2-D sin-cos positional code.
        pe_max_freq: Highest frequency of the positional code in cycles per image side; default
            half the finest level's grid side (its Nyquist limit: higher frequencies alias on the
            grid the student is trained on, see docs/architecture.md). Checkpoints written before this
            setting existed used 64 and keep it.
        level_dim: Width of the learned level embedding.
        level_entry: Where the level code enters the student: ``late`` (default; the last hidden
            layer, so the layers before it run once per location for all levels) or ``first`` (the
            paper's design; every (location, level) runs the whole MLP). Checkpoints written before
            this setting existed are ``first``. See docs/architecture.md.
        rgb: Also predict each patch's mean colour (the pixel level, named ``rgb``).
        rgb_weight: Loss weight of the ``rgb`` level.
        level_weights: Loss weight per level name (default 1 each; the ``rgb`` level's weight is
            ``rgb_weight``).
        queries_per_image: (location, level) queries sampled per image and step, split evenly over
            levels; 0 or None for every location of every level.
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps before the cosine decay.
        min_lr_ratio: Final learning rate as a fraction of ``lr`` at ``trainer.max_steps``.
        stats_images: Training images whose teacher features set the per-level mean and std.
        feature_cache: Folder of a teacher-feature cache (float16, memory-mapped): the first epoch
            writes each training image's teacher features there, later epochs (and later runs with
            the same teacher and images) read them instead of running the teacher. Not with
            ``data.hflip``. Default: no cache.
        compile: ``torch.compile`` the student's training forward: True for the default backend,
            or a backend name (``inductor``, ``aot_eager``, ...). Default off.
        max_nonfinite_steps: A step whose loss is NaN or infinite is skipped (no update) and
            counted (``train/nonfinite_steps``); this many in a row stop the run with an error.
        meta_inner_steps: 0 (default) distills plainly. k > 0 meta-learns the student's
            initialization for fast per-image fitting (``apm perceive``) with first-order Reptile:
            each step fits a copy of the student to each image of the batch for k steps (the
            ``ours`` recipe of apm/perceive.py), then moves the shared weights toward the mean of
            the fitted copies, using the AdamW above with ``lr`` on the difference.
        meta_inner_lr: Learning rate of the inner AdamW (``apm perceive``'s default is 1e-3).
        student: ``apm`` (default: the column filter and the shared field MLP above) or ``glom``
            (Hinton's GLOM, apm/glom.py: a column of level states per patch, updated for T iterations
            by bottom-up and top-down nets and parameter-free attention within each level; a head
            per level). Training, evaluation, fitting and every tool work with either. GLOM uses
            ``pe_dim`` and ``pe_max_freq``; ``hidden_dims``, ``level_dim``, ``level_entry`` and
            ``column_filters`` are APM's only. See docs/glom.md.
        glom: GLOM's settings (with ``student: glom``), each optional: ``dim`` (state width per level,
            128), ``hidden`` (bottom-up and top-down nets' hidden width, 256), ``iterations`` (T, 3),
            ``beta`` (attention inverse temperature, 1.0), ``window`` (attend within this many cells,
            null = the whole grid), ``agreement`` (weight of the level above's similarities in the
            attention, 0.0), ``chunk`` (attention rows per block, 256: bounds memory),
            ``every_iteration`` (the loss on every iteration's readout, not only the last; training
            only, false), ``attention`` and ``top_down`` (false drops that term: ablations, true).
    """

    def __init__(
        self,
        teacher: str | None = None,
        teacher_args: dict[str, Any] | None = None,
        teachers: list[dict[str, Any]] | None = None,
        teacher_precision: str = "32",
        image_size: int = 448,
        patch_size: int | None = None,
        hidden_dims: list[int] = [1024, 1024, 1024, 1024],
        column_filters: int = 1,
        pixel_window: int = 0,
        pixel_spacing: float = 1.0,
        subpatch_moves: bool = False,
        pe_dim: int = 256,
        pe_max_freq: float | None = None,
        level_dim: int = 64,
        level_entry: str = DEFAULT_LEVEL_ENTRY,
        rgb: bool = True,
        rgb_weight: float = 1.0,
        level_weights: dict[str, float] | None = None,
        queries_per_image: int | None = 2048,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.05,
        stats_images: int = 64,
        feature_cache: str | None = None,
        compile: bool | str = False,
        max_nonfinite_steps: int = 10,
        meta_inner_steps: int = 0,
        meta_inner_lr: float = 1e-3,
        student: str = "apm",
        glom: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        check_settings(self.hparams)
        self.automatic_optimization = not meta_inner_steps  # Reptile sets its own update
        self.guard = NonFiniteGuard(max_nonfinite_steps, meta_inner_steps, lr, meta_inner_lr)
        self._skip_update = False
        # Kept out of the module tree: a frozen teacher is rebuilt from its name, not checkpointed.
        object.__setattr__(self, "teacher", build_teacher(teacher, teacher_args, teachers, image_size))
        if teacher is None and teachers is None:  # recorded by name, as checkpoints always were
            self.hparams.teacher = DEFAULT_TEACHER
        self.teacher.set_precision(str(teacher_precision))
        patch_size = patch_size or self.teacher.patch_size
        check_image_size(image_size, patch_size, "the student's patch size ('model.patch_size')")
        self.levels: list[Level] = list(self.teacher.levels)
        if rgb:
            self.levels.append(Level(RGB, (image_size // patch_size,) * 2, 3))
        self.loss_weights = level_loss_weights([l.name for l in self.levels], rgb_weight, level_weights)
        if pe_max_freq is None:
            pe_max_freq = max(max(l.grid) for l in self.levels) / 2
        self.student = self._new_student(patch_size, pe_max_freq, level_entry)
        self.target_source = TeacherTargets(self.teacher, rgb, patch_size)
        self.standardizer = LevelStandardizer([l.dim for l in self.levels])

    def _new_student(self, patch_size: int, pe_max_freq: float, level_entry: str
                     ) -> APMStudent | GLOMStudent:
        hp = self.hparams
        if hp.student == "glom":
            student = GLOMStudent(self.levels, hp.image_size, patch_size, hp.pe_dim, pe_max_freq,
                                  **(hp.glom or {}))
        else:
            student = APMStudent(self.levels, hp.image_size, patch_size, hp.pe_dim, hp.level_dim,
                                 hp.hidden_dims, pe_max_freq, level_entry, hp.column_filters,
                                 hp.get("pixel_window", 0), hp.get("pixel_spacing", 1.0))
        if hp.compile:  # compiles __call__ in place: parameter names and checkpoints are unchanged
            student.compile(**({} if hp.compile is True else {"backend": hp.compile}))
        return student

    # -- targets ---------------------------------------------------------------------------------
    def targets(self, images: torch.Tensor, index: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per-level targets on the teacher's scale, (B, h, w, d): the teacher's levels, then the
        patch-mean colour when ``rgb`` is on (``apm.targets.TeacherTargets``; with the feature
        cache open and the images' dataset ``index`` given, cached features are read)."""
        return self.target_source(images, index)

    @property
    def feature_cache(self):
        """The open teacher-feature cache (``apm.cache``), or None."""
        return self.target_source.cache

    def open_feature_cache(self, sources) -> None:
        """Open (or create) the cache in ``feature_cache`` for these training images, in order."""
        strategy = self.trainer.strategy if self._trainer is not None else None
        hp = self.hparams
        self.target_source.open_cache(hp.feature_cache, hp.teacher, hp.teacher_args, sources, strategy)

    @torch.no_grad()
    def fit_statistics(self, batches) -> None:
        """Set each level's mean and std from the teacher's features of ``stats_images`` images."""
        seen = 0
        rank0 = self._trainer is None or self.trainer.is_global_zero
        for batch in tqdm(batches, desc="level statistics", leave=False, disable=not rank0):
            images = batch_images(batch)[0][: self.hparams.stats_images - seen].to(self.device)
            self.standardizer.update(self.targets(images))
            seen += len(images)
            if seen >= self.hparams.stats_images:
                break
        if seen == 0:
            raise ConfigError("No training images to compute level statistics from; check 'data.images'.")
        self.standardizer.finalize()

    def on_fit_start(self) -> None:
        if self.trainer.world_size > 1:  # ranks sample different query locations, reproducibly
            torch.manual_seed(torch.initial_seed() + self.global_rank)
        dm = self.trainer.datamodule
        if self.hparams.feature_cache:
            if not hasattr(dm, "cache_sources"):
                raise ConfigError("Setting 'model.feature_cache' needs the APMDataModule (it indexes "
                                  "the training images); unset it or use APMDataModule.")
            self.open_feature_cache(dm.cache_sources())
        if not bool(self.standardizer.ready) and hasattr(dm, "stats_dataloader"):
            self.fit_statistics(dm.stats_dataloader())  # a resumed run restored them instead

    def on_train_start(self) -> None:
        if not bool(self.standardizer.ready):  # plain dataloaders: available only from here on
            self.fit_statistics(self.trainer.train_dataloader)

    # -- steps -----------------------------------------------------------------------------------
    def sample_locations(self, batch: int, device: torch.device) -> list[torch.Tensor | None]:
        """Per level, (B, n) random distinct locations, or None for every location: this step's
        queries (``apm.objective.QuerySampler``; levels on one grid share theirs when the level
        code enters late)."""
        sampler = QuerySampler(self.levels, self.hparams.queries_per_image, self.student.entry > 0)
        return sampler.per_level(sampler.draw(batch, device))

    @torch.no_grad()
    def moved_targets(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Targets of each image moved by a random sub-patch offset (``apm.offgrid``: the frame's
        last pixels mirrored past its edge), and per level the coordinates (B, h*w, 2) in the
        unmoved frame where those cells sit."""
        patch, size = self.student.patch_size, images.shape[-1]
        moves = torch.randint(0, patch, (images.shape[0], 2)).tolist()
        canvas = offgrid.pad_canvas(images, patch - 1)
        moved = torch.stack([offgrid.window(c, size, dy, dx) for c, (dy, dx) in zip(canvas, moves)])
        feats = self.targets(moved)
        points = [torch.stack([offgrid.moved_coords(tuple(f.shape[1:3]), size, dy, dx, f.device)
                               for dy, dx in moves]) for f in feats]
        return feats, points

    def distillation_loss(self, images: torch.Tensor, feats: Sequence[torch.Tensor],
                          points: Sequence[torch.Tensor] | None = None
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss on one batch, given its per-level targets (B, h, w, d) on the
        teacher's scale (at the cells' ``points``, per level (B, h*w, 2), when not the grid's
        centres): queries sampled per level, MSE on the standardized scale, weighted mean over
        levels. Returns the loss and per-level ``train/loss_*`` and ``train/cos_*``."""
        locs = self.sample_locations(images.shape[0], images.device)
        targets = [gather(f, loc) for f, loc in zip(feats, locs)]
        z = [self.standardizer.encode(i, t) for i, t in enumerate(targets)]
        every = getattr(self.student, "settings", {}).get("every_iteration")  # GLOM's option
        if points is not None:  # every level its own table: levels share work only on the grid
            steps = [self.student(images, locs, points=points)]
        else:
            steps = self.student.iterate(images, locs) if every else [self.student(images, locs)]
        per_step = [weighted_mse(p, z, self.loss_weights) for p in steps]  # the mean over them
        preds, losses = steps[-1], per_step[-1][1]
        loss = per_step[0][0] if len(per_step) == 1 else torch.stack([l for l, _ in per_step]).mean()
        logs = {}
        for i, (lvl, t, p, l) in enumerate(zip(self.levels, targets, preds, losses)):
            cos = F.cosine_similarity(self.standardizer.decode(i, p.float()), t, dim=-1).mean()
            logs.update({f"train/loss_{lvl.name}": l, f"train/cos_{lvl.name}": cos})
        return loss, logs

    def training_step(self, batch: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                      batch_idx: int) -> torch.Tensor:
        images, index = batch_images(batch)
        if self.hparams.meta_inner_steps:
            return self.meta_step(images, self.targets(images, index))
        if self.hparams.get("subpatch_moves"):
            feats, points = self.moved_targets(images)
            loss, logs = self.distillation_loss(images, feats, points)
        else:
            loss, logs = self.distillation_loss(images, self.targets(images, index))
        # A non-finite loss still goes through backward (data-parallel ranks must all reduce
        # gradients); on_before_optimizer_step then drops the gradients, so nothing is updated.
        self._skip_update = not self.loss_is_finite(loss)
        self.log("train/nonfinite_steps", float(self.nonfinite_total))
        if not self._skip_update:
            self.log_dict(logs)
            self.log("train/loss", loss, prog_bar=True)
        return loss

    def meta_step(self, images: torch.Tensor, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """One Reptile step (``apm.meta.reptile_step``)."""
        return reptile_step(self, images, feats)

    def loss_is_finite(self, loss: torch.Tensor) -> bool:
        """Whether ``loss`` is finite on every rank (``apm.nonfinite.NonFiniteGuard``: counted,
        and NonFiniteLossError after ``max_nonfinite_steps`` in a row)."""
        strategy = self.trainer.strategy if self._trainer is not None and self.trainer.world_size > 1 else None
        return self.guard.check(loss, self.global_step if self._trainer is not None else "?", strategy)

    @property
    def nonfinite_total(self) -> int:
        return self.guard.total

    @property
    def nonfinite_in_a_row(self) -> int:
        return self.guard.in_a_row

    def on_before_optimizer_step(self, optimizer) -> None:
        if self._skip_update:  # gradients of a non-finite loss: AdamW skips parameters without one
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            self._skip_update = False

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor, levels: Sequence[int] | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """Per level: cosine, centred cosine, R^2 (teacher's scale) and MSE (standardized), each (B,)."""
        levels = select_levels(self.levels, levels)
        feats = self.targets(images)
        return self.fidelity([feats[i] for i in levels], self.predict_features(images, levels), levels)

    def fidelity(self, teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor],
                 levels: Sequence[int]) -> dict[str, dict[str, torch.Tensor]]:
        """``evaluate``'s measures from features already computed: teacher and student (B, h, w, d)
        on the teacher's scale, one of each per entry of ``levels``."""
        out = {}
        for i, t, p in zip(levels, teacher, student):
            out[self.levels[i].name] = {
                "cos": metrics.cosine(p, t),
                "cos_centered": metrics.centered_cosine(p, t),
                "r2": metrics.r2(p, t),
                "mse": metrics.mse(self.standardizer.encode(i, p), self.standardizer.encode(i, t)),
            }
        return out

    def validation_step(self, batch: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                        batch_idx: int) -> None:
        images = batch_images(batch)[0]
        res = self.evaluate(images)
        n = images.shape[0]
        # sync_dist: under DDP every rank validates a shard; the epoch means cover all of them
        # (and every rank's ModelCheckpoint sees the same val/loss).
        for name, m in res.items():
            self.log_dict({f"val/{k}_{name}": v.mean() for k, v in m.items()}, batch_size=n, sync_dist=True)
        for k in ("cos", "r2", "mse"):
            self.log(f"val/{k}_mean", torch.stack([m[k].mean() for m in res.values()]).mean(),
                     batch_size=n, sync_dist=True)
        w = torch.tensor(self.loss_weights, device=images.device)
        loss = (torch.stack([m["mse"].mean() for m in res.values()]) * w).sum() / w.sum()
        self.log("val/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)

    # -- inference -------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_features(self, images: torch.Tensor, levels: Sequence[int] | None = None,
                         chunk: int | None = None) -> list[torch.Tensor]:
        """The student's dense features on the teacher's scale, per level (B, h, w, d)."""
        levels = select_levels(self.levels, levels)
        preds = self.student.dense(images, levels, chunk)
        return [self.standardizer.decode(i, p.float()) for i, p in zip(levels, preds)]

    def predict_step(self, batch: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                     batch_idx: int) -> list[torch.Tensor]:
        return self.predict_features(batch_images(batch)[0])

    # -- optimisation and checkpoints ------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.AdamW(self.student.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        total = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else None
        if total is None and self.trainer is not None:
            total = int(self.trainer.estimated_stepping_batches) if math.isfinite(self.trainer.estimated_stepping_batches) else None

        schedule = partial(warmup_cosine, warmup=hp.warmup_steps, total=total, final=hp.min_lr_ratio)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["apm"] = {"teacher": teacher_fingerprint(self.teacher),
                             "levels": [(l.name, list(l.grid), l.dim) for l in self.levels]}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        path = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        if self._trainer is not None and self.trainer.state.fn == "fit" and "optimizer_states" not in checkpoint:
            raise ConfigError(
                f"Setting '--ckpt_path': {path} holds a student's weights only (written by apm "
                f"perceive or APM.save: no optimizer, scheduler or step), so a training run cannot "
                f"be resumed from it. --ckpt_path takes a checkpoint of 'apm fit' (last.ckpt, "
                f"best-*.ckpt); the fitted student itself loads in apm eval, islands, interpolate, "
                f"perceive, classify and APM.from_pretrained.")
        self._adopt_legacy_settings(checkpoint)
        check_compatible(checkpoint, self, path, "ckpt_path")

    def _adopt_legacy_settings(self, checkpoint: dict) -> None:
        """Settings whose default changed: a checkpoint written before keeps its old value."""
        saved = checkpoint.get("hyper_parameters") or {}
        if "pe_max_freq" not in saved:
            self.student.pe_max_freq = self.hparams.pe_max_freq = LEGACY_DEFAULTS["pe_max_freq"]
        entry = LEGACY_DEFAULTS["level_entry"]
        if "level_entry" not in saved and self.student.level_entry != entry:
            # another shape: rebuilt before the weights are loaded (and before the optimizer exists)
            st = self.student
            self.hparams.level_entry = entry
            self.student = self._new_student(st.patch_size, st.pe_max_freq, entry).to(
                st.first.weight.device)

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: Any = "cpu", setting: str = "--ckpt",
                        **overrides: Any) -> "APMModule":
        """A module in eval mode from a checkpoint of ``apm fit`` (or a ``save_pretrained``
        folder), read without pickle (``overrides`` replace saved hyperparameters; a change of
        shape is refused with ConfigError naming ``setting``). See ``apm.loading.load_student``."""
        from apm.loading import load_student

        return load_student(path, device=map_location, trained=False, overrides=overrides, setting=setting)
