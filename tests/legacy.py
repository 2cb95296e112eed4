"""Checkpoints as earlier versions wrote them, for the tests of ``apm.checkpoints.upgrade_settings``."""

from __future__ import annotations

from typing import Any

from apm.checkpoints import LEGACY_STUDENT_KEYS


def flat_settings(hp: dict[str, Any], *missing: str) -> dict[str, Any]:
    """``hyper_parameters`` in the flat form written before ``model.student`` held the student's
    settings (``hidden_dims``, ``level_entry``, ... beside the others; GLOM's as ``student: glom``
    and ``glom: {...}``), without the settings ``missing`` (written before they existed)."""
    hp = dict(hp)
    record = hp.pop("student")
    args = dict(record["init_args"])
    if record["class_path"].endswith("GLOMSettings"):
        hp.update(student="glom", pe_dim=args.pop("pe_dim"), pe_max_freq=args.pop("pe_max_freq"), glom=args)
    else:  # settings added after the flat form (pixel_window, ...) were never written in it
        hp.update({k: v for k, v in args.items() if k in LEGACY_STUDENT_KEYS})
    return {k: v for k, v in hp.items() if k not in missing}
