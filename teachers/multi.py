"""Several teachers as one: a TeacherSet's levels are its members' levels side by side.

``model.teachers`` lists teachers as ``{name, args, image_size, alias}``: the registered name, the
factory's own arguments, the input side that teacher is fed (default ``data.image_size``) and the
prefix of its level names (default the name). Level names become ``<alias>/<level>``
(``dinov2_small/block12``, ``mvitv2_s/block3``), unique across teachers. The set's ``forward``
resizes the image to each member's own size (bilinear, antialiased) and concatenates the members'
level lists, so DINOv2 at 448 and MViTv2 at 224 run on one 448-pixel input. Every level keeps its
own grid and width; the student places all of them on the image through continuous coordinates.

``build_teacher`` is the one place that turns ``model.teacher`` / ``model.teacher_args`` /
``model.teachers`` into a teacher: one name gives that teacher exactly as before, a list gives a set.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from teachers.base import Level, Teacher
from teachers.errors import ConfigError, UserError
from teachers.registry import create_teacher

DEFAULT_TEACHER = "dinov2_small"
SETTING = "model.teachers"
SEPARATOR = "/"  # between a teacher's alias and its level's name
MEMBER_KEYS = ("name", "args", "image_size", "alias")
_ALIAS = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # also a folder name (the feature cache)


@dataclass(frozen=True)
class TeacherSpec:
    """One entry of ``model.teachers``, with its defaults filled in."""

    name: str
    args: dict[str, Any]
    image_size: int
    alias: str


class TeacherSet(Teacher):
    """Frozen teachers side by side; level ``<alias>/<level>`` of the set is that member's level.

    Args:
        members: The member teachers, each built at its own ``image_size``.
        specs: One ``TeacherSpec`` per member (registered name, arguments, size, alias).
        image_size: Side of the images the set is given (``data.image_size``); each member gets
            them resized to its own side.
    """

    def __init__(self, members: Sequence[Teacher], specs: Sequence[TeacherSpec], image_size: int):
        super().__init__()
        if len(members) != len(specs) or not members:
            raise ValueError("a TeacherSet needs one spec per member, and at least one member")
        self.members = nn.ModuleList(members)
        self.specs = list(specs)
        self.image_size = image_size
        self._levels = [Level(f"{s.alias}{SEPARATOR}{l.name}", l.grid, l.dim)
                        for s, m in zip(self.specs, self.members) for l in m.levels]
        self.freeze()

    @property
    def aliases(self) -> list[str]:
        return [s.alias for s in self.specs]

    @property
    def levels(self) -> list[Level]:
        return self._levels

    @property
    def patch_size(self) -> int:
        """The student's default patch: ``image_size`` over the first member's grid side (its
        image side over its patch), so the trigger column has that member's grid."""
        first, spec = self.members[0], self.specs[0]
        side = first.image_size // first.patch_size
        if self.image_size % side:
            lo = max(side, self.image_size // side * side)
            raise ConfigError(
                f"Setting 'model.patch_size': unset, it defaults to data.image_size over the grid side "
                f"of the first teacher in '{SETTING}' ({spec.alias}: {first.image_size} px / patch "
                f"{first.patch_size} = {side}), and data.image_size {self.image_size} is not a "
                f"multiple of {side}. Set 'model.patch_size' to a divisor of data.image_size, or "
                f"'data.image_size' to a multiple of {side} (e.g. {lo} or {lo + side})."
            )
        return self.image_size // side

    def set_precision(self, precision: str) -> "TeacherSet":
        """Run every member in ``precision`` ("32", "bf16" or "16")."""
        super().set_precision(precision)
        for m in self.members:
            m.set_precision(precision)
        return self

    def resize(self, images: torch.Tensor, member: int) -> torch.Tensor:
        """Images (B, 3, H, W) resized to member ``member``'s side (bilinear, antialiased)."""
        s = self.members[member].image_size
        if tuple(images.shape[-2:]) == (s, s):
            return images
        return F.interpolate(images, size=(s, s), mode="bilinear", antialias=True, align_corners=False)

    @torch.no_grad()
    def member_features(self, member: int, images: torch.Tensor) -> list[torch.Tensor]:
        """Member ``member``'s levels (B, h, w, d), float32, for images at the set's size."""
        return self.members[member](self.resize(images, member))

    def extract(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [f for i in range(len(self.members)) for f in self.member_features(i, images)]

    @property
    def weights_source(self) -> str | None:
        known = [f"{s.alias}: {m.weights_source}" for s, m in zip(self.specs, self.members) if m.weights_source]
        return "; ".join(known) or None

    def describe(self) -> dict:
        members = [{"alias": s.alias, **{k: v for k, v in m.describe().items() if k != "class"}}
                   for s, m in zip(self.specs, self.members)]
        return {**super().describe(), "members": members}


def parse_specs(specs: Sequence[dict[str, Any]], image_size: int,
                setting: str = SETTING) -> list[TeacherSpec]:
    """Check ``model.teachers`` entries and fill in their defaults (size ``image_size``, alias the
    registered name without any ``module:`` part); ConfigError naming the entry otherwise."""
    if isinstance(specs, (str, dict)) or not specs:
        raise ConfigError(
            f"Setting {setting!r}: give a non-empty list of teachers, each {{name: ..., args: {{...}}, "
            f"image_size: ..., alias: ...}} (only name is required); for one teacher, "
            f"'model.teacher' and 'model.teacher_args' do the same."
        )
    out: list[TeacherSpec] = []
    for i, spec in enumerate(specs):
        where = f"{setting}[{i}]"
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise ConfigError(f"Setting {where!r}: {spec!r} is not a teacher entry; write "
                              f"{{name: dinov2_small, args: {{pretrained: true}}}} (name is required).")
        unknown = sorted(set(spec) - set(MEMBER_KEYS))
        if unknown:
            raise ConfigError(f"Setting {where!r}: unknown keys {unknown}; an entry takes "
                              f"{', '.join(MEMBER_KEYS)}, and the teacher's own arguments go in 'args'.")
        args = spec.get("args") or {}
        if not isinstance(args, dict):
            raise ConfigError(f"Setting '{where}.args': {args!r} is not a mapping of the teacher's "
                              f"arguments, e.g. {{pretrained: false, levels: [4, 8]}}.")
        if "image_size" in args:
            raise ConfigError(f"Setting '{where}.args.image_size': a teacher's input side is "
                              f"'{where}.image_size' (default data.image_size); move it there.")
        size = spec.get("image_size")
        size = image_size if size is None else size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"Setting '{where}.image_size': {size!r} is not a positive number of pixels.")
        alias = spec.get("alias") or spec["name"].rpartition(":")[2]
        if not isinstance(alias, str) or not _ALIAS.fullmatch(alias):
            raise ConfigError(
                f"Setting '{where}.alias': {alias!r} cannot prefix level names; use letters, digits, "
                f"'_', '.' and '-' (it names the teacher's levels, '{alias}/block1', and its "
                f"feature-cache folder)."
            )
        taken = next((j for j, s in enumerate(out) if s.alias == alias), None)
        if taken is not None:
            raise ConfigError(
                f"Setting '{where}.alias': entries {taken} and {i} of '{setting}' are both named "
                f"{alias!r}, so their levels would share names; give one of them an alias "
                f"(e.g. alias: {alias}_2)."
            )
        out.append(TeacherSpec(spec["name"], dict(args), int(size), alias))
    return out


def _for_member(error: UserError, where: str, name: str, own_size: bool) -> UserError:
    """A member's error with the single-teacher setting names replaced by the entry's."""
    msg = str(error).replace("'model.teacher_args", f"'{where}.args").replace(
        "'model.teacher'", f"'{where}.name'")
    if own_size:
        msg = msg.replace("'data.image_size'", f"'{where}.image_size'")
    elif "'data.image_size'" in msg:
        msg += f" ({where} takes data.image_size; '{where}.image_size' gives it its own.)"
    if where not in msg:
        msg = f"Setting {where!r} ({name}): {msg}"
    return type(error)(msg)


def build_teachers(specs: Sequence[dict[str, Any]], image_size: int, setting: str = SETTING) -> TeacherSet:
    """A TeacherSet from ``model.teachers`` entries; a member's configuration error names its entry
    (``model.teachers[1].name``, ``model.teachers[0].args.levels``, ...)."""
    parsed = parse_specs(specs, image_size, setting)
    members = []
    for i, (raw, spec) in enumerate(zip(specs, parsed)):
        where = f"{setting}[{i}]"
        try:
            members.append(create_teacher(spec.name, image_size=spec.image_size, **spec.args))
        except UserError as e:
            raise _for_member(e, where, spec.name, raw.get("image_size") is not None) from None
    return TeacherSet(members, parsed, image_size)


def build_teacher(teacher: str | None, teacher_args: dict[str, Any] | None,
                  teachers: Sequence[dict[str, Any]] | None, image_size: int) -> Teacher:
    """The teacher of ``model.teacher`` (default dinov2_small) and ``model.teacher_args``, or the
    TeacherSet of ``model.teachers``; setting both is a ConfigError."""
    if teachers is None:
        return create_teacher(teacher or DEFAULT_TEACHER, image_size=image_size, **(teacher_args or {}))
    if teacher is not None or teacher_args:
        given = " and ".join(f"'model.{k}' ({v!r})" for k, v in
                             (("teacher", teacher), ("teacher_args", teacher_args)) if v)
        raise ConfigError(
            f"Setting {SETTING!r}: a list of teachers replaces 'model.teacher' and "
            f"'model.teacher_args', but {given} is set as well, so which teacher to distill is "
            f"ambiguous. Set both to null (configs/agglomerative.yaml does so after configs/apm.yaml; "
            f"on the command line add --model.teacher null --model.teacher_args null), put that "
            f"teacher in the list as {{name: ..., args: ...}}, or drop {SETTING!r} for one teacher."
        )
    return build_teachers(teachers, image_size)
