"""A real-size distillation on a GPU for a fixed time, and what it achieved.

    python -m experiments.distill_gpu --images /path/to/photos --minutes 5 --json out.json

DINOv2-base architecture (random weights with layer scale 1.0, so that every block changes the
features; no download needed), 448 px, every block + rgb (13 levels), the default student and
recipe of configs/apm.yaml, a real Lightning fit in the default precision. Prints and writes:
queries/s and images/s after warm-up, peak GPU memory, the student's achieved FLOP/s as a share of
the device's measured bf16 peak (teacher time included in the step, so a lower bound), and the
time of a 13-level island figure (t-SNE on the device) from the final checkpoint.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import yaml


from experiments.common import ROOT
from experiments.common import count_flops, matmul_rate, sync, wall, write_results

from apm.data import APMDataModule, SKIMAGE_PHOTOS
from apm.module import APMModule
from apm.precision import autocast, default_precision


class StepTimer(L.Callback):
    """Wall time of every training step after ``warmup`` steps (device synchronized)."""

    def __init__(self, warmup: int = 20):
        self.warmup, self.times, self.t = warmup, [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= self.warmup:
            sync(pl_module.device)
            self.t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.t is not None:
            sync(pl_module.device)
            self.times.append(time.perf_counter() - self.t)
            self.t = None


def photo_folder(tmp: Path) -> Path:
    from apm.data import skimage_photo

    for name in SKIMAGE_PHOTOS:
        skimage_photo(name).save(tmp / f"{name}.png")
    return tmp


def run_settings(recipe: dict, tiny: bool, error) -> tuple[dict, dict]:
    """configs/apm.yaml's model and data settings with this run's teacher (DINOv2-base with random
    weights, or with ``tiny`` the tiny one and a small student on the CPU)."""
    m, d = recipe["model"], recipe["data"]
    m.update(teacher="dinov2_base", teacher_args={"pretrained": False,
                                                  "config_overrides": {"layerscale_value": 1.0}})
    if tiny:
        m.update(teacher="dinov2_tiny", teacher_args={"pretrained": False}, hidden_dims=[32],
                 stats_images=4)
        d.update(image_size=56, batch_size=2)
    elif not torch.cuda.is_available():
        error("needs a CUDA GPU (or --tiny)")
    return m, d


def student_flops(model, batch: torch.Tensor, device: torch.device, precision: str) -> int:
    """The student's own FLOPs of one training step: forward and backward, no teacher."""
    def student_step():
        with autocast(device, precision):
            locs = model.sample_locations(batch.shape[0], device)
            preds = model.student(batch, locs)
        sum(p.float().square().mean() for p in preds).backward()

    return count_flops(student_step)


def after_training(model, batch: torch.Tensor, device: torch.device, tmp: Path) -> tuple[float, float, dict]:
    """The teacher's forward time on the batch, the time of one island figure, and the trained
    student's fidelity on two images of the batch."""
    from apm.analysis import island_figures

    with torch.no_grad():
        teacher_t = statistics.median([wall(lambda: model.teacher(batch), device) for _ in range(5)])
    t0 = time.perf_counter()
    island_figures(model, batch[:1], ["figure"], tmp / "islands")
    return teacher_t, time.perf_counter() - t0, model.evaluate(batch[:2])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=Path, default=None, help="folder of photographs (default: scikit-image's)")
    p.add_argument("--minutes", type=float, default=5.0, help="training time")
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps instead")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--workers", type=int, default=8, help="data loader processes")
    p.add_argument("--tiny", action="store_true", help="a tiny teacher and student on the CPU (tests)")
    a = p.parse_args(argv)
    recipe = yaml.safe_load((ROOT / "configs" / "apm.yaml").read_text())
    m, d = run_settings(recipe, a.tiny, p.error)
    device = torch.device("cpu" if a.tiny else "cuda")
    precision = default_precision(device)
    tmp = Path(tempfile.mkdtemp())
    images = a.images or photo_folder(tmp)
    L.seed_everything(0, verbose=False)
    model = APMModule(**m, image_size=d["image_size"])
    data = APMDataModule(images=str(images), image_size=d["image_size"], batch_size=d["batch_size"],
                         val_fraction=0.1, num_workers=a.workers)
    timer = StepTimer(warmup=2 if a.tiny else 20)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = L.Trainer(accelerator=device.type, devices=1, precision=precision,
                        max_time={"minutes": a.minutes}, max_steps=a.steps or recipe["trainer"]["max_steps"],
                        logger=L.pytorch.loggers.CSVLogger(tmp, name="csv"), callbacks=[timer],
                        default_root_dir=tmp, check_val_every_n_epoch=10_000,
                        enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(model, datamodule=data)
    ckpt = tmp / "final.ckpt"
    trainer.save_checkpoint(ckpt)
    peak_mem = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    model.to(device)  # Lightning hands the model back on the CPU

    batch = next(iter(data.train_dataloader()))
    batch = batch.to(device) if isinstance(batch, torch.Tensor) else batch[0].to(device)
    flops = student_flops(model, batch, device, precision)
    step_s = statistics.median(timer.times)
    peak = matmul_rate(device, torch.bfloat16, 256 if a.tiny else 8192, reps=5)
    queries = d["batch_size"] * m["queries_per_image"]
    teacher_t, figure_s, val = after_training(model.eval(), batch, device, tmp)
    res = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
        "precision": precision, "teacher": f"{m['teacher']} (random weights)",
        "teacher_precision": model.hparams.teacher_precision,
        "levels": len(model.levels), "image": d["image_size"], "batch": d["batch_size"],
        "queries_per_image": m["queries_per_image"], "images": len(data.train_set),
        "minutes": a.minutes, "steps": trainer.global_step,
        "step_s_median": step_s, "queries_per_s": queries / step_s,
        "images_per_s": d["batch_size"] / step_s, "teacher_forward_s": teacher_t,
        "student_flops_per_step": flops, "bf16_peak_flops": peak,
        "student_share_of_bf16_peak": flops / step_s / peak,
        "peak_gpu_memory_bytes": peak_mem, "island_figure_s": figure_s,
        "train_r2_mean": float(torch.stack([v["r2"].mean() for v in val.values()]).mean()),
    }
    for k, v in res.items():
        print(f"{k:28s} {v:.4g}" if isinstance(v, float) else f"{k:28s} {v}", flush=True)
    write_results(a.json, res)
    return res


if __name__ == "__main__":
    main()
