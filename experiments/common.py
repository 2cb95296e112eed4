"""What the experiments share: timing, memory, FLOPs, the device they ran on, results files, and one
``distill()`` (a run of ``apm fit`` that keeps its last checkpoint). Run an experiment from the
repository root as ``python -m experiments.NAME``."""

from __future__ import annotations

import ctypes
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


# -- measuring -----------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def median_time(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        wall(fn, device)
    return statistics.median(wall(fn, device) for _ in range(reps))


def _sdpa_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(q, k, v)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of ``fn`` by torch.utils.flop_counter, with CPU fused attention counted too."""
    from torch.utils.flop_counter import FlopCounterMode

    extra = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        extra[op] = _sdpa_flops
    with FlopCounterMode(display=False, custom_mapping=extra) as fc:
        fn()
    return int(fc.get_total_flops())


class Memory:
    """Peak memory of a call above what was in use before it (bytes); None if not measurable."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = "cuda max_memory_allocated" if device.type == "cuda" else None
        self._libc = None
        if device.type == "cpu" and Path("/proc/self/clear_refs").exists():
            try:
                self._libc = ctypes.CDLL("libc.so.6")
                self._reset_hwm()
                # Fixed threshold: every large tensor is its own mapping, returned to the OS on free,
                # so the resident size follows live tensors (glibc otherwise keeps freed ones).
                self._libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
                self.method = "peak RSS (VmHWM after clear_refs) minus RSS before"
            except OSError:
                self._libc = None

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) * 1024

    @staticmethod
    def _reset_hwm() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def peak(self, fn: Callable[[], object]) -> int | None:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            fn()
            sync(self.device)
            return int(torch.cuda.max_memory_allocated(self.device) - before)
        if self._libc is None:
            return None
        self._libc.malloc_trim(0)
        self._reset_hwm()
        before = self._status("VmRSS")
        fn()
        return int(self._status("VmHWM") - before)


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, reps: int = 3) -> float:
    """Achieved FLOP/s of an n x n x n matmul."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = median_time(lambda: a @ b, device, reps)
    return 2 * n**3 / t


# -- results ------------------------------------------------------------------------------------
def rounded(x, digits: int = 4):
    """Floats in nested dicts and lists rounded (result files stay small)."""
    if isinstance(x, float):
        return round(x, digits)
    if isinstance(x, dict):
        return {k: rounded(v, digits) for k, v in x.items()}
    return [rounded(v, digits) for v in x] if isinstance(x, list) else x


def write_results(path: Path, res: dict) -> None:
    """Write an experiment's results as indented JSON (folders created) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {path}")


def device_info(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "cpu_cores": os.cpu_count(),
            "cpu": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.+)", f.read())
        info["cpu"] = m.group(1).strip() if m else info["cpu"]
    except OSError:
        pass
    from apm.precision import cpu_has_bf16

    info["cpu_bf16"] = cpu_has_bf16()
    info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# -- distillation --------------------------------------------------------------------------------
class Distilled(NamedTuple):
    """A finished ``apm fit``: its last checkpoint, wall seconds and optimizer steps."""

    ckpt: Path
    seconds: float
    steps: int


def distill(out: Path, configs: Sequence[str | Path], *settings: str, csv_log: bool = False) -> Distilled:
    """``apm fit`` with ``configs`` (files, later ones override) and ``settings`` (command-line
    pairs such as ``--trainer.max_steps 100``), in ``out``: no validation, no progress bar, only a
    last.ckpt kept (and a CSV log with ``csv_log``)."""
    from apm.cli import build_cli

    logger = (["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(out)]
              if csv_log else ["--trainer.logger", "false"])
    args = ["fit", *(a for c in configs for a in ("-c", str(c))), "--data.val_fraction", "0",
            "--trainer.check_val_every_n_epoch", "100000", *logger,
            "--trainer.callbacks", "lightning.pytorch.callbacks.ModelCheckpoint",
            "--trainer.callbacks.save_last", "true", "--trainer.callbacks.save_top_k", "0",
            "--trainer.default_root_dir", str(out), "--trainer.enable_progress_bar", "false", *settings]
    start = time.perf_counter()
    cli = build_cli(args)
    return Distilled(Path(cli.trainer.checkpoint_callback.last_model_path), time.perf_counter() - start,
                     int(cli.trainer.global_step))
