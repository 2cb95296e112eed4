"""The default numeric precision: bf16 autocast where the hardware runs bf16 fast, else fp32.

On a CPU without bf16 instructions (AVX2-only, or AVX-512 without ``avx512_bf16``) PyTorch emulates
bf16 matmuls, hundreds of times slower than fp32, so bf16 there is never a default.
"""

from __future__ import annotations

import platform
from functools import lru_cache
from typing import Iterable

import torch

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``); empty where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_bf16(flags: Iterable[str] | None = None, machine: str | None = None) -> bool:
    """True when this CPU (or one with these ``/proc/cpuinfo`` ``flags`` and ``machine``
    architecture) has bf16 matmul instructions (x86 ``avx512_bf16``/``amx_bf16``)."""
    if (machine or platform.machine()).lower() not in ("x86_64", "amd64"):
        return False  # no reliable probe elsewhere: fp32 is the safe default
    return any(f in (cpu_flags() if flags is None else set(flags)) for f in BF16_CPU_FLAGS)


def _device_type(device: str | torch.device | None) -> str:
    if device is None or str(device) in ("auto", "gpu"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(str(device)).type


def bf16_fast(device: str | torch.device | None = None) -> bool:
    """Whether bf16 matmuls run natively (fast) on ``device`` (``cpu``, ``cuda``, ``auto``/None)."""
    kind = _device_type(device)
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if kind == "cpu":
        return cpu_has_bf16()
    return False


def default_precision(device: str | torch.device | None = None) -> str:
    """Lightning precision for ``device``: ``"bf16-mixed"`` where bf16 is native, else
    ``"32-true"``. ``device`` may be a torch device, a Lightning accelerator name, or None/auto."""
    return "bf16-mixed" if bf16_fast(device) else "32-true"


def autocast(device: str | torch.device, precision: str):
    """An autocast context for a Lightning precision string (a no-op for full precision)."""
    kind = _device_type(device)
    if precision.startswith("bf16") and precision != "bf16-true":
        return torch.autocast(kind, dtype=torch.bfloat16)
    if precision.startswith("16") and precision != "16-true":
        return torch.autocast(kind, dtype=torch.float16)
    return torch.autocast(kind, enabled=False)


def pick_device(device: str | torch.device) -> torch.device:
    """``auto`` = CUDA when available, else CPU; ConfigError for CUDA without a GPU."""
    from apm.errors import ConfigError

    device = str(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("Setting '--device': CUDA is not available on this machine; use --device cpu.")
    return torch.device(device)
