"""The LightningModule: distill a frozen teacher's per-level features into an APM student."""

from __future__ import annotations

import logging
import math
from functools import partial
from typing import Any, Sequence

import lightning as L
import torch
from jsonargparse import lazy_instance, set_parsing_settings
import torch.nn.functional as F
from tqdm.auto import tqdm

from apm import offgrid
from apm.checkpoints import Checkpointed, upgrade_settings
from apm.data import batch_images
from apm.evaluation import Evaluation
from apm.errors import ConfigError
from apm.nonfinite import NonFiniteGuard
from apm.meta import reptile_step
from apm.objective import QuerySampler, gather, warmup_cosine, weighted_mse
from apm.standardize import LevelStandardizer
from apm.targets import TeacherTargets
from apm.students import RGB, APMSettings, Student, StudentSettings, create_student, student_settings
from apm.students.registry import settings_record
from teachers import Level
from teachers.base import TEACHER_PRECISIONS, check_image_size
from teachers.multi import DEFAULT_TEACHER, build_teacher

log = logging.getLogger(__name__)
set_parsing_settings(subclasses_enabled=[StudentSettings])  # model.student: any registered student's settings
DEFAULT_STUDENT = lazy_instance(APMSettings)


def check_settings(hp: Any) -> None:
    """ConfigError naming the setting, for values the loop cannot take (the student's settings are
    checked by ``apm.students.student_settings``)."""
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


class APMModule(Evaluation, Checkpointed, L.LightningModule):
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
        student: The student and its settings, a ``StudentSettings`` class path:
            ``apm.students.APMSettings`` (default: the column filter and the shared field MLP) or
            ``apm.students.GLOMSettings`` (Hinton's GLOM, docs/glom.md), with its ``init_args``
            (``pe_dim``, ``hidden_dims``, ``level_entry``, ... ; see those classes). Training,
            evaluation, fitting and every tool work with either. The settings of earlier versions
            (``hidden_dims``, ``level_entry``, ``student: glom``, ``glom: {...}``, ...) are read
            as before (``apm.checkpoints.upgrade_settings``).
        subpatch_moves: Distill toward the teacher on each photograph moved by a random sub-patch
            offset, its cells queried where they sit (docs/field.md). Not with ``feature_cache``.
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
    """

    def __init__(
        self,
        teacher: str | None = None,
        teacher_args: dict[str, Any] | None = None,
        teachers: list[dict[str, Any]] | None = None,
        teacher_precision: str = "32",
        image_size: int = 448,
        patch_size: int | None = None,
        student: StudentSettings = DEFAULT_STUDENT,
        subpatch_moves: bool = False,
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
        **legacy: Any,
    ):
        super().__init__()
        given = "apm" if student is DEFAULT_STUDENT else student  # the old flat settings may be given
        upgraded = upgrade_settings({"student": given, **legacy})
        if set(upgraded) != {"student"}:
            raise TypeError(f"APMModule got unexpected keyword arguments {sorted(set(upgraded) - {'student'})}")
        settings = student_settings(upgraded["student"])
        self.save_hyperparameters()
        for hp in (self._hparams, self._hparams_initial):  # the student's settings as one plain record
            for k in legacy:
                hp.pop(k, None)
            hp["student"] = settings_record(settings)
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
        self.student = self._new_student(settings, patch_size)
        self.target_source = TeacherTargets(self.teacher, rgb, patch_size)
        self.standardizer = LevelStandardizer([l.dim for l in self.levels])

    @property
    def student_settings(self) -> StudentSettings:
        """The student's settings (``model.student``)."""
        return student_settings(self.hparams.student)

    def _new_student(self, settings: StudentSettings, patch_size: int) -> Student:
        s = settings_record(settings)["init_args"]
        student = create_student(settings.name, self.levels, self.hparams.image_size, patch_size, **s)
        if self.hparams.compile:  # compiles __call__ in place: parameter names and checkpoints are unchanged
            student.compile(**({} if self.hparams.compile is True else {"backend": self.hparams.compile}))
        return student

    # -- targets ---------------------------------------------------------------------------------
    def targets(self, images: torch.Tensor, index: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per-level targets on the teacher's scale, (B, h, w, d): the teacher's levels, then the
        patch-mean colour when ``rgb`` is on (``apm.targets.TeacherTargets``; with the feature
        cache open and the images' dataset ``index`` given, cached features are read)."""
        return self.target_source(images, index)

    @property
    def feature_cache(self):  # the open teacher-feature cache (apm.cache), or None
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

    def distillation_loss(self, images: torch.Tensor, feats: Sequence[torch.Tensor],
                          points: Sequence[torch.Tensor] | None = None) -> tuple[torch.Tensor, dict]:
        """The loss on one batch given its per-level targets (B, h, w, d) on the teacher's scale (at
        ``points`` (B, h*w, 2) per level, if not the grid's centres): sampled queries, MSE on the
        standardized scale, weighted over levels; and the ``train/loss_*``, ``train/cos_*`` logs."""
        locs = self.sample_locations(images.shape[0], images.device)
        targets = [gather(f, loc) for f, loc in zip(feats, locs)]
        z = [self.standardizer.encode(i, t) for i, t in enumerate(targets)]
        every = getattr(self.student_settings, "every_iteration", False)  # GLOM's option
        kw = {} if points is None else {"points": points}  # the cells of moved passes
        steps = self.student.iterate(images, locs) if every and not kw else [self.student(images, locs, **kw)]
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
        feats, points = (offgrid.moved_targets(self.targets, images, self.student.patch_size)
                         if self.hparams.subpatch_moves else (self.targets(images, index), None))
        loss, logs = self.distillation_loss(images, feats, points)
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

    nonfinite_total = property(lambda self: self.guard.total)
    nonfinite_in_a_row = property(lambda self: self.guard.in_a_row)

    def on_before_optimizer_step(self, optimizer) -> None:
        if self._skip_update:  # gradients of a non-finite loss: AdamW skips parameters without one
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            self._skip_update = False

    # -- optimisation ------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.AdamW(self.student.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        total = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else None
        if total is None and self.trainer is not None:
            total = int(self.trainer.estimated_stepping_batches) if math.isfinite(self.trainer.estimated_stepping_batches) else None
        schedule = partial(warmup_cosine, warmup=hp.warmup_steps, total=total, final=hp.min_lr_ratio)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
