"""Benchmark: what the APM student costs and saves, measured in one run on one device.

    python -m experiments.bench --device cpu --json experiments/results/bench_cpu.json --quick

Figures (keys of the JSON file; null where a figure does not apply to the device):

1. ``train``: training throughput of our student at the paper's configuration (448 px, 32x32 grid,
   MLP 2048-4096-4096-4096-2048-1024, one level of width 1024) with our defaults (factorized first
   layer, the device's default precision) against the official forward (column repeated per
   location, whole first layer per query, chunks of 512 concatenated, fp32); steps interleaved.
   -> ``train_speedup_vs_baseline_ratio``.
2. ``dense``: dense inference (all locations, all levels) of the student against the teacher's own
   forward at 224, 448, 896 px: FLOPs (torch.utils.flop_counter), wall time, peak memory; FLOPs
   and time of both student designs (``level_entry`` first and late) side by side
   -> ``dense_flops_vs_teacher_ratio_448`` (the default design's).
3. ``streaming``: peak memory of chunked inference at a fixed chunk size across those sizes
   -> ``streaming_memory_growth_ratio``.
4. ``gpu``: the student step's achieved matmul FLOP/s as a fraction of a measured bf16 peak (GPU only).
5. ``cache``: epoch time of a real Lightning fit without and with the teacher-feature cache.
6. ``fidelity``: wall time to mean R^2 0.9 on one image, our default recipe against the official one
   (Adam 1e-4, fp32, all queries every step, unnormalized MSE, the paper's student), and our recipe
   with each student design -> ``time_to_fidelity_vs_baseline_ratio`` (the default design's).
7. ``islands``: the joint 3-D t-SNE of an island figure (teacher beside student, 2 x 1024 points per
   level at 448 px, 12 levels of DINOv2-small): scikit-learn on the CPU (what figures used before)
   against ``apm.islands.embed_rgb_levels`` (``apm.tsne``) on the run's device, with the
   trustworthiness of each
   -> ``islands_speedup_ratio``.

Peak memory is the device's allocator peak on CUDA; on CPU it is the process's peak resident set
size (Linux VmHWM, reset through /proc/self/clear_refs, glibc's mmap threshold pinned and free
memory trimmed first) minus the resident size before the call.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange

from apm import metrics
from apm.precision import autocast, default_precision
from apm.students.apm import LEVEL_ENTRIES, APMSettings, APMStudent
from experiments.common import (ROOT, Memory, count_flops, device_info, matmul_rate, median_time, sync, wall,
                                write_results)
from teachers import Level, create_teacher

DEFAULT_LEVEL_ENTRY = APMSettings.level_entry


# -- settings ------------------------------------------------------------------------------------
@dataclass
class Settings:
    """Sizes of one benchmark run. ``quick`` fits a 2-core CPU in 10 minutes; ``tiny`` is for tests."""

    # 1. training throughput at the paper's configuration
    paper_image: int = 448
    paper_hidden: list[int] = field(default_factory=lambda: [4096, 4096, 4096, 2048, 1024])
    paper_pe: int = 1024
    paper_width: int = 1024
    train_batch: int = 2
    train_rounds: int = 5
    # 2./3. dense and streaming inference
    teacher: str = "dinov2_small"
    sizes: list[int] = field(default_factory=lambda: [224, 448, 896])
    student_hidden: list[int] = field(default_factory=lambda: [1024, 1024, 1024, 1024])
    student_pe: int = 256
    student_level: int = 64
    infer_reps: int = 3
    stream_chunk: int = 1024
    # 5. epoch time with and without the cache
    cache_image: int = 448
    cache_images: int = 8
    cache_epochs: int = 3
    cache_hidden: list[int] = field(default_factory=lambda: [1024, 1024, 1024, 1024])
    # 6. time to fidelity
    fid_image: int = 448
    fid_levels: list[int] = field(default_factory=lambda: [4, 8, 12])
    fid_hidden: list[int] = field(default_factory=lambda: [1024, 1024, 1024, 1024])
    fid_target: float = 0.9
    fid_eval_every: int = 10
    fid_budget_s: float = 900.0
    fid_recipe: dict = field(default_factory=dict)  # overrides of configs/apm.yaml's model recipe
    fid_seeds: int = 1  # races from different initial students; the ratio is their median
    # 7. island-figure embedding: levels of the figure, and how many of them each method embeds
    # (the figure's time is the per-level mean times the levels: scikit-learn takes minutes)
    isl_image: int = 448
    isl_figure_levels: int = 12
    isl_levels_ours: int = 12
    isl_levels_sklearn: int = 2


QUICK = dict(train_rounds=3, infer_reps=1, cache_epochs=3, fid_budget_s=200.0, isl_levels_ours=1,
             isl_levels_sklearn=1)
# On a GPU, 2 images (2,048 queries) a step leave the device idle between kernel launches; 32 images
# (32,768 queries, the same for both forwards) measure the arithmetic.
# A race lasts seconds there: run several (one image at lr 1e-3 sometimes stalls, see
# docs/benchmarks.md) and report the median.
CUDA = dict(train_batch=32, fid_seeds=5, fid_budget_s=30.0)
TINY = dict(paper_image=56, paper_hidden=[64, 64], paper_pe=16, paper_width=16, train_batch=1,
            train_rounds=1, teacher="dinov2_tiny", sizes=[28, 56], student_hidden=[32, 32],
            student_pe=16, student_level=8, infer_reps=1, stream_chunk=16, cache_image=28,
            cache_images=2, cache_epochs=2, cache_hidden=[32], fid_image=28, fid_levels=[1, 3],
            fid_hidden=[64, 64], fid_target=0.5, fid_eval_every=5, fid_budget_s=2.0, isl_image=56,
            isl_figure_levels=3, isl_levels_ours=1, isl_levels_sklearn=1)


# -- the official forward (baseline) -------------------------------------------------------------
def official_forward(student: APMStudent, images: torch.Tensor, levels: list[int],
                     chunk: int = 512) -> list[torch.Tensor]:
    """The official APM code's forward: the trigger column repeated at every
    location, the whole first layer applied to each concatenated query, chunks of 512 queries run
    one after another and concatenated. Same weights as ``student``; (B, N, d) per level."""
    col = student.trigger(images)
    out = []
    for lvl in levels:
        q = rearrange(student.query_vectors(col, lvl, student.coords(lvl)), "b n d -> (b n) d")
        pred = torch.cat([student.decode(lvl, student.first(c)) for c in q.split(chunk)])
        out.append(rearrange(pred, "(b n) d -> b n d", b=images.shape[0]))
    return out


def photo(size: int, device: torch.device, n: int = 1) -> torch.Tensor:
    from apm.data import SKIMAGE_PHOTOS, ImageDataset

    ds = ImageDataset(list(SKIMAGE_PHOTOS), size)
    return torch.stack([ds.image(i % len(ds)) for i in range(n)]).to(device)


# -- 1. training throughput ----------------------------------------------------------------------
def bench_train(s: Settings, device: torch.device, precision: str, log) -> dict:
    torch.manual_seed(0)
    grid = s.paper_image // 14
    level = Level("feat", (grid, grid), s.paper_width)
    student = APMStudent([level], s.paper_image, 14, pe_dim=s.paper_pe, level_dim=0,
                         hidden_dims=s.paper_hidden).to(device)
    opt = torch.optim.Adam(student.parameters(), lr=1e-4)
    images = photo(s.paper_image, device, s.train_batch)
    target = torch.randn(s.train_batch, grid * grid, s.paper_width, device=device)
    queries = s.train_batch * grid * grid

    def ours():
        with autocast(device, precision):
            pred = student(images, [None])[0]
        loss = F.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def baseline():
        pred = official_forward(student, images, [0])[0]
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def step_flops(fn):
        return count_flops(fn)

    flops_ours, flops_base = step_flops(ours), step_flops(baseline)  # also the warm-up steps
    d_in = student.first.in_features
    first_flops = 6 * d_in * student.first.out_features * queries  # fwd + grad W + grad input
    t_ours, t_base = [], []
    for r in range(s.train_rounds):  # interleaved, so load from elsewhere hits both alike
        order = (ours, baseline) if r % 2 == 0 else (baseline, ours)
        for fn in order:
            (t_ours if fn is ours else t_base).append(wall(fn, device))
        log(f"  round {r + 1}/{s.train_rounds}: ours {t_ours[-1]:.2f} s, baseline {t_base[-1]:.2f} s")
    ratios = [b / o for o, b in zip(t_ours, t_base)]
    to, tb = statistics.median(t_ours), statistics.median(t_base)
    return {
        "config": {"image": s.paper_image, "grid": grid, "hidden": s.paper_hidden,
                   "pe_dim": s.paper_pe, "level_width": s.paper_width, "first_layer_in": d_in,
                   "params": sum(p.numel() for p in student.parameters()),
                   "batch_images": s.train_batch, "queries_per_step": queries},
        "ours_precision": precision,
        "baseline_precision": "32-true",
        "step_s_ours": to, "step_s_baseline": tb,
        "queries_per_s_ours": queries / to, "queries_per_s_baseline": queries / tb,
        "images_per_s_ours": s.train_batch / to, "images_per_s_baseline": s.train_batch / tb,
        "flops_per_step_ours": flops_ours, "flops_per_step_baseline": flops_base,
        "flops_ratio_baseline_over_ours": flops_base / flops_ours,
        "first_layer_flop_share_baseline": first_flops / flops_base,
        "speedup_per_round": ratios,
        "train_speedup_vs_baseline_ratio": statistics.median(ratios),
    }


# -- 2./3. dense and streaming inference ---------------------------------------------------------
def inference_models(s: Settings, size: int, device: torch.device, precision: str):
    """The teacher and a student of each design (``level_entry``), for one image size."""
    teacher = create_teacher(s.teacher, image_size=size, pretrained=False).to(device)
    teacher.set_precision("bf16" if precision.startswith("bf16") else "32")  # its fast mode, as the student
    levels = list(teacher.levels) + [Level("rgb", teacher.levels[0].grid, 3)]
    students = {}
    for entry in LEVEL_ENTRIES:
        torch.manual_seed(0)
        students[entry] = APMStudent(levels, size, teacher.patch_size, s.student_pe, s.student_level,
                                     s.student_hidden, level_entry=entry).to(device).eval()
    return teacher, students


def all_queries(student: APMStudent) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (level, location) query of the student, levels interleaved (any order works)."""
    ids = torch.cat([torch.full((l.num_locations,), i) for i, l in enumerate(student.levels)])
    coords = torch.cat([student.coords(i).cpu() for i in range(len(student.levels))])
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))
    return ids[perm], coords[perm]


def dense_runner(model: APMStudent, images: torch.Tensor, device: torch.device,
                 precision: str) -> Callable[[], list[torch.Tensor]]:
    """A call of the student's dense answers on ``images`` (no gradients, autocast as measured)."""
    @torch.no_grad()
    def run():
        with autocast(device, precision):
            return model.dense(images)
    return run


def _growth(key: str, table: list[dict]) -> float | None:
    a, b = table[0][key], table[-1][key]
    return None if a in (None, 0) or b is None else b / a


def bench_inference(s: Settings, device: torch.device, precision: str, mem: Memory, log) -> tuple[dict, dict]:
    rows, stream_rows = [], []
    for size in s.sizes:
        teacher, students = inference_models(s, size, device, precision)
        student = students[DEFAULT_LEVEL_ENTRY]
        images = photo(size, device)
        ids, coords = all_queries(student)
        ids, coords = ids.to(device), coords.to(device)

        def dense_of(model: APMStudent) -> Callable[[], list[torch.Tensor]]:
            return dense_runner(model, images, device, precision)

        run_student = dense_of(student)

        @torch.no_grad()
        def run_teacher():
            with autocast(device, precision):
                return teacher(images)

        @torch.no_grad()
        def run_stream():
            total = 0.0
            with autocast(device, precision):
                for _, _, pred in student.stream(images, ids, coords, s.stream_chunk):
                    total += float(pred.float().sum())  # consume and drop each chunk
            return total

        row = {"image": size, "locations": student.levels[0].num_locations,
               "levels": len(student.levels), "queries": int(len(ids)),
               "student_flops": count_flops(run_student), "teacher_flops": count_flops(run_teacher),
               "student_s": median_time(run_student, device, s.infer_reps),
               "teacher_s": median_time(run_teacher, device, s.infer_reps),
               "stream_s": median_time(run_stream, device, s.infer_reps)}
        row["dense_flops_vs_teacher_ratio"] = row["student_flops"] / row["teacher_flops"]
        row["designs"] = {e: {"flops": count_flops(dense_of(m)),
                              "s": median_time(dense_of(m), device, s.infer_reps)}
                          for e, m in students.items()}
        row["student_peak_bytes"] = mem.peak(run_student)
        row["teacher_peak_bytes"] = mem.peak(run_teacher)
        srow = {"image": size, "chunk": s.stream_chunk, "queries": int(len(ids)),
                "peak_bytes": mem.peak(run_stream), "s": row["stream_s"]}
        log(f"  {size}px: student {row['student_s']:.2f} s, teacher {row['teacher_s']:.2f} s, "
            f"stream peak {_mb(srow['peak_bytes'])}, teacher peak {_mb(row['teacher_peak_bytes'])}")
        rows.append(row)
        stream_rows.append(srow)
        teacher = student = students = None  # freed before the next size

    at_448 = [r["dense_flops_vs_teacher_ratio"] for r in rows if r["image"] == 448]
    dense = {"sizes": rows, "memory_method": mem.method, "level_entry": DEFAULT_LEVEL_ENTRY,
             "dense_flops_vs_teacher_ratio_448": at_448[0] if at_448 else None,
             "location_growth": rows[-1]["locations"] / rows[0]["locations"],
             **{f"{k}_growth": _growth(k, rows) for k in
                ("student_flops", "teacher_flops", "student_s", "teacher_s", "student_peak_bytes",
                 "teacher_peak_bytes")}}
    streaming = {"sizes": stream_rows, "chunk": s.stream_chunk, "memory_method": mem.method,
                 "streaming_memory_growth_ratio": _growth("peak_bytes", stream_rows),
                 "teacher_memory_growth_ratio": _growth("teacher_peak_bytes", rows)}
    return dense, streaming


def _mb(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:.1f} MB"


# -- 4. GPU share of the bf16 peak ---------------------------------------------------------------
def bench_gpu(s: Settings, device: torch.device, precision: str, train: dict) -> dict:
    if device.type != "cuda":
        return {"bf16_peak_flops": None, "student_step_flops_per_s": None,
                "student_fraction_of_bf16_peak": None}
    peak = max(matmul_rate(device, torch.bfloat16, 8192, reps=5) for _ in range(2))
    achieved = train["flops_per_step_ours"] / train["step_s_ours"]
    return {"bf16_peak_flops": peak, "student_step_flops_per_s": achieved,
            "student_fraction_of_bf16_peak": achieved / peak}


# -- 5. epoch time with and without the teacher cache --------------------------------------------
def bench_cache(s: Settings, device: torch.device, precision: str, log) -> dict:
    import lightning as L

    from apm.cache import estimate_bytes
    from apm.data import APMDataModule
    from apm.module import APMModule

    class EpochTimer(L.Callback):
        def __init__(self):
            self.times: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module):
            sync(device)
            self.t = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            sync(device)
            self.times.append(time.perf_counter() - self.t)

    def fit(cache_dir: str | None) -> tuple[list[float], APMModule]:
        L.seed_everything(0, verbose=False)
        model = APMModule(teacher=s.teacher, teacher_args={"pretrained": False},
                          image_size=s.cache_image, hidden_dims=s.cache_hidden,
                          stats_images=2, feature_cache=cache_dir)
        data = APMDataModule(image_size=s.cache_image, batch_size=4, val_fraction=0,
                             max_images=s.cache_images, num_workers=0)
        timer = EpochTimer()
        trainer = L.Trainer(accelerator=device.type, devices=1, precision=precision,
                            max_epochs=s.cache_epochs, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, callbacks=[timer])
        trainer.fit(model, datamodule=data)
        return timer.times, model

    with tempfile.TemporaryDirectory() as tmp:
        plain, model = fit(None)
        log(f"  without cache: epochs {[round(t, 2) for t in plain]} s")
        cached, _ = fit(str(Path(tmp) / "cache"))
        log(f"  with cache:    epochs {[round(t, 2) for t in cached]} s")
    later = statistics.median(cached[1:]) if len(cached) > 1 else None
    base = statistics.median(plain)
    return {"images": s.cache_images, "image": s.cache_image, "epochs": s.cache_epochs,
            "cache_bytes": estimate_bytes(model.teacher.levels, s.cache_images),
            "epoch_s_no_cache": base, "epoch_s_cache_fill": cached[0], "epoch_s_cached": later,
            "epoch_times_no_cache": plain, "epoch_times_cache": cached,
            "cache_epoch_speedup_ratio": None if later is None else base / later}


# -- 6. time to fidelity -------------------------------------------------------------------------
def bench_fidelity(s: Settings, device: torch.device, precision: str, log) -> dict:
    runs = []
    for seed in range(s.fid_seeds):
        if s.fid_seeds > 1:
            log(f"  initial student {seed + 1}/{s.fid_seeds}")
        runs.append(fidelity_race(s, device, precision, log, seed))
    ratios = [r["time_to_fidelity_vs_baseline_ratio"] for r in runs]
    reached = [x for x in ratios if x is not None]
    return {**runs[0], "seeds": s.fid_seeds, "ratio_per_seed": ratios,
            "ours_missed_target": len(ratios) - len(reached), "runs": runs[1:],
            "time_to_fidelity_vs_baseline_ratio": statistics.median(reached) if reached else None}


def lockstep(runs: dict[str, tuple[Callable, Callable]], feats: list[torch.Tensor], s: Settings,
             device: torch.device, log) -> dict[str, dict]:
    """Train the recipes in lockstep (a few steps each in turn, so that load from elsewhere
    slows both alike), each on its own clock, until each reaches the target or the budget."""
    state = {k: {"seconds": None, "steps": 0, "train_s": 0.0, "curve": []} for k in runs}
    while True:
        live = [k for k, st in state.items() if st["seconds"] is None and st["train_s"] < s.fid_budget_s]
        if not live:
            break
        for k in live:
            step, predict = runs[k]
            st = state[k]
            for _ in range(s.fid_eval_every):
                st["train_s"] += wall(step, device)
                st["steps"] += 1
            with torch.no_grad():
                per_level = [float(metrics.r2(p, t).mean()) for p, t in zip(predict(), feats)]
            r2 = sum(per_level) / len(per_level)
            st["curve"].append((st["steps"], round(st["train_s"], 3), round(r2, 4),
                                [round(v, 3) for v in per_level]))
            if r2 >= s.fid_target:
                st["seconds"] = st["train_s"]
        log("  " + ", ".join(f"{k}: step {st['steps']} R^2 {st['curve'][-1][2]:.3f} "
                             f"({st['train_s']:.1f} s)" for k, st in state.items()))
    for st in state.values():
        st["final_r2"] = st["curve"][-1][2]
    return state


def official_recipe(student: APMStudent, images: torch.Tensor, feats: list[torch.Tensor]
                    ) -> tuple[Callable, Callable]:
    """The official recipe's step and dense prediction: Adam 1e-4, fp32, every query every step,
    MSE on the raw features."""
    off_opt = torch.optim.Adam(student.parameters(), lr=1e-4)
    raw = [rearrange(f, "b h w d -> b (h w) d") for f in feats]
    levels = list(range(len(raw)))

    def official_step():
        preds = official_forward(student, images, levels)
        loss = torch.stack([F.mse_loss(p, t) for p, t in zip(preds, raw)]).sum()
        off_opt.zero_grad(set_to_none=True)
        loss.backward()
        off_opt.step()

    return official_step, lambda: student.dense(images)


def fidelity_race(s: Settings, device: torch.device, precision: str, log, seed: int = 0) -> dict:
    import lightning as L
    import yaml

    from apm.module import APMModule

    recipe = yaml.safe_load((ROOT / "configs" / "apm.yaml").read_text())["model"]
    recipe.update(teacher=s.teacher, hidden_dims=s.fid_hidden, stats_images=1,
                  teacher_args={"pretrained": False, "levels": s.fid_levels})
    recipe.update(s.fid_recipe)
    images = photo(s.fid_image, device)

    def fresh_module(level_entry: str) -> APMModule:
        torch.manual_seed(seed)  # the same initial student for both recipes
        return APMModule(**{**recipe, "level_entry": level_entry}, image_size=s.fid_image).to(device)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # ours: the module's loss (its query sampling, standardization, level weights), AdamW
        # with configs/apm.yaml's schedule, the device's default precision; one per student design
        def ours(level_entry: str) -> tuple[Callable, Callable, list[torch.Tensor]]:
            module = fresh_module(level_entry)
            module.trainer = L.Trainer(barebones=True, max_steps=20000, accelerator=device.type,
                                       devices=1, logger=False)
            module.fit_statistics([images])
            opt_cfg = module.configure_optimizers()
            opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
            feats = module.targets(images)  # once: every recipe trains on these targets in memory
            module.train()

            def step():
                with autocast(device, precision):
                    loss, _ = module.distillation_loss(images, feats)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()

            return step, lambda: module.predict_features(images), feats

        contenders = {e: ours(e) for e in LEVEL_ENTRIES}
        feats = contenders[DEFAULT_LEVEL_ENTRY][2]

        official = official_recipe(fresh_module("first").student, images, feats)  # the paper's design
        res = lockstep({**{e: c[:2] for e, c in contenders.items()}, "official": official}, feats, s, device, log)
        ours, official = res[DEFAULT_LEVEL_ENTRY], res["official"]
    reached = ours["seconds"] is not None and official["seconds"] is not None
    if ours["seconds"] is None:
        ratio = None
    else:  # the official recipe's time is at least its training time when it did not get there
        ratio = (official["seconds"] or official["train_s"]) / ours["seconds"]
    return {"image": s.fid_image, "teacher_levels": s.fid_levels, "levels": len(feats),
            "student_hidden": s.fid_hidden, "target_r2": s.fid_target, "budget_s": s.fid_budget_s,
            "ours": ours, "official": official, "both_reached": reached,
            "level_entry": DEFAULT_LEVEL_ENTRY, "designs": {e: res[e] for e in LEVEL_ENTRIES},
            "ratio_is_lower_bound": ours["seconds"] is not None and official["seconds"] is None,
            "time_to_fidelity_vs_baseline_ratio": ratio}


# -- 7. island-figure embedding ------------------------------------------------------------------
def bench_islands(s: Settings, device: torch.device, log) -> dict:
    import numpy as np
    from sklearn.manifold import TSNE, trustworthiness

    from apm.islands import as_points, embed_rgb_levels, minmax, reduce_dims

    teacher = create_teacher(s.teacher, image_size=s.isl_image, pretrained=False,
                             config_overrides={"layerscale_value": 1.0}).to(device)
    feats = teacher(photo(s.isl_image, device))
    g = torch.Generator(device=device).manual_seed(0)
    pairs = [(f[0], f[0] + 0.3 * f.std() * torch.randn(f[0].shape, generator=g, device=device))
             for f in feats]  # teacher beside a near copy (a student), as in a figure

    def sklearn_levels(blocks: list[list[torch.Tensor]]) -> list[np.ndarray]:
        """What the figure ran before apm.tsne: scikit-learn's t-SNE per level on the CPU, exact
        up to 1,200 points and Barnes-Hut beyond, with embed_rgb's PCA, perplexity and rate."""
        out = []
        for level in blocks:
            x = reduce_dims(np.concatenate([as_points(b) for b in level]))
            n = len(x)
            out.append(minmax(TSNE(3, perplexity=min(30.0, (n - 1) / 3), init="pca", learning_rate=max(n / 48, 10.0),
                            random_state=0, max_iter=1000, method="exact" if n <= 1200 else "barnes_hut",
                            ).fit_transform(x.astype(np.float32))))
        return out

    def run(ours: bool, count: int) -> tuple[float, float]:
        """Seconds per level (``count`` levels embedded in one call, batched where the method
        can) and the trustworthiness of the first level's embedding."""
        blocks = [list(p) for p in pairs[:count]]
        embed = (lambda b: embed_rgb_levels(b, "tsne", device=device)) if ours else sklearn_levels
        seconds = wall(lambda: embed(blocks), device) / count
        x = reduce_dims(torch.cat(pairs[0]).flatten(0, 1).double().cpu().numpy())
        y = embed([[x]])[0]
        return seconds, float(trustworthiness(x, y[0] if ours else y, n_neighbors=10))

    n = s.isl_figure_levels
    ours_s, ours_t = run(True, min(s.isl_levels_ours, len(pairs)))
    log(f"  ours (apm.tsne on {device.type}): {ours_s:.2f} s per level, trustworthiness {ours_t:.4f}")
    sk_s, sk_t = run(False, min(s.isl_levels_sklearn, len(pairs)))
    log(f"  scikit-learn (cpu): {sk_s:.2f} s per level, trustworthiness {sk_t:.4f}")
    points = 2 * pairs[0][0].shape[0] * pairs[0][0].shape[1]
    return {"image": s.isl_image, "points_per_level": points, "figure_levels": n,
            "method_ours": f"apm.tsne (torch, exact) on {device.type}", "level_s_ours": ours_s,
            "level_s_sklearn": sk_s, "figure_s_ours": n * ours_s,
            "figure_s_sklearn": n * sk_s, "levels_timed_ours": min(s.isl_levels_ours, len(pairs)),
            "levels_timed_sklearn": min(s.isl_levels_sklearn, len(pairs)),
            "trustworthiness_ours": ours_t, "trustworthiness_sklearn": sk_t,
            "islands_speedup_ratio": sk_s / ours_s}


# -- report --------------------------------------------------------------------------------------
def _fmt(x, fmt: str = "{:.2f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def inference_rows(d: dict, st: dict) -> list[str]:
    """Table rows of parts 2 and 3: dense and streaming inference per size, and their growth."""
    f = _fmt
    lines = [
        "2./3. inference, 1 image, all locations and levels    (student = dense; stream = chunks of "
        f"{st['chunk']})",
        "   size  locs  student GFLOP  teacher GFLOP  student s  teacher s  stream s  "
        "student MB  teacher MB  stream MB",
    ]
    for r, sr in zip(d["sizes"], st["sizes"]):
        mb = lambda b: "n/a" if b is None else f"{b / 2**20:.1f}"  # noqa: E731
        lines.append(
            f"   {r['image']:4d} {r['locations']:5d} {r['student_flops'] / 1e9:14.1f} "
            f"{r['teacher_flops'] / 1e9:14.1f} {r['student_s']:10.3f} {r['teacher_s']:10.3f} "
            f"{r['stream_s']:9.3f} {mb(r['student_peak_bytes']):>11} {mb(r['teacher_peak_bytes']):>11} "
            f"{mb(sr['peak_bytes']):>10}")
    lines.append(f"   student = level_entry {d['level_entry']}; dense by design, GFLOP (s):")
    for r in d["sizes"]:
        lines.append(f"   {r['image']:4d} " + ", ".join(
            f"{e} {v['flops'] / 1e9:.2f} ({v['s']:.3f} s, {v['flops'] / r['teacher_flops']:.2f}x the "
            f"teacher)" for e, v in r["designs"].items()))
    lines += [
        f"   growth {d['sizes'][0]['image']}->{d['sizes'][-1]['image']} ({d['location_growth']:.0f}x "
        f"locations): student FLOPs {f(d['student_flops_growth'])}x, teacher FLOPs "
        f"{f(d['teacher_flops_growth'])}x, student time {f(d['student_s_growth'])}x, teacher time "
        f"{f(d['teacher_s_growth'])}x",
        f"   peak memory growth: streaming {f(st['streaming_memory_growth_ratio'])}x, teacher "
        f"{f(st['teacher_memory_growth_ratio'])}x, dense student {f(d['student_peak_bytes_growth'])}x"
        f"  ({d['memory_method']})",
    ]
    return lines


def table(res: dict) -> str:
    f = _fmt

    tr, d, st, g, c, fi = (res[k] for k in ("train", "dense", "streaming", "gpu", "cache", "fidelity"))
    lines = [
        f"device: {res['env']['device']} ({res['env']['cpu']}, {res['env']['threads']} threads"
        + (f", {res['env']['gpu']}" if "gpu" in res["env"] else "") + f"), torch {res['env']['torch']}",
        "",
        "1. training throughput at the paper's configuration   ours       official   ratio",
        f"   queries/s                                    {tr['queries_per_s_ours']:10.0f} "
        f"{tr['queries_per_s_baseline']:10.0f}   {tr['train_speedup_vs_baseline_ratio']:.2f}x",
        f"   images/s                                     {tr['images_per_s_ours']:10.3f} "
        f"{tr['images_per_s_baseline']:10.3f}",
        f"   GFLOP per step                               {tr['flops_per_step_ours'] / 1e9:10.0f} "
        f"{tr['flops_per_step_baseline'] / 1e9:10.0f}   {tr['flops_ratio_baseline_over_ours']:.2f}x less work",
        f"   precision: ours {tr['ours_precision']}, official {tr['baseline_precision']}; first "
        f"layer = {100 * tr['first_layer_flop_share_baseline']:.1f}% of the official step's FLOPs",
        "",
        *inference_rows(d, st),
        "",
        f"4. GPU: student step at {f(g['student_fraction_of_bf16_peak'], '{:.1%}')} of the measured "
        f"bf16 peak ({f(None if g['bf16_peak_flops'] is None else g['bf16_peak_flops'] / 1e12, '{:.0f}')}"
        " TFLOP/s)",
        f"   matmul here: fp32 {res['matmul']['fp32_gflops']:.0f} GFLOP/s, bf16 "
        f"{res['matmul']['bf16_gflops']:.1f} GFLOP/s",
        "",
        f"5. epoch ({c['images']} images at {c['image']} px): no cache {c['epoch_s_no_cache']:.2f} s, "
        f"cache fill {c['epoch_s_cache_fill']:.2f} s, cached {f(c['epoch_s_cached'])} s -> "
        f"{f(c['cache_epoch_speedup_ratio'])}x; cache {c['cache_bytes'] / 2**20:.1f} MB",
        "",
        f"6. time to mean R^2 {fi['target_r2']} on one image ({fi['levels']} levels, {fi['image']} px): "
        f"ours {f(fi['ours']['seconds'], '{:.1f}')} s ({fi['ours']['steps']} steps), official "
        f"{f(fi['official']['seconds'], '{:.1f}')} s ({fi['official']['steps']} steps, R^2 "
        f"{fi['official']['final_r2']:.3f}) -> {f(fi['time_to_fidelity_vs_baseline_ratio'])}x"
        + (" (lower bound)" if fi["ratio_is_lower_bound"] else ""),
        "   our recipe by student design: " + ", ".join(
            f"{e} {f(v['seconds'], '{:.1f}')} s ({v['steps']} steps, R^2 {v['final_r2']:.3f})"
            for e, v in fi["designs"].items()),
        *([f"   {fi['seeds']} initial students: ratios "
           f"{', '.join(f(r) for r in fi['ratio_per_seed'])} -> median "
           f"{f(fi['time_to_fidelity_vs_baseline_ratio'])}x; ours missed the target in "
           f"{fi['ours_missed_target']}"] if fi["seeds"] > 1 else []),
        "",
        f"7. island figure, {res['islands']['figure_levels']} levels of {res['islands']['points_per_level']} "
        f"points: ours ({res['islands']['method_ours']}) {res['islands']['figure_s_ours']:.1f} s, "
        f"scikit-learn {res['islands']['figure_s_sklearn']:.1f} s -> "
        f"{res['islands']['islands_speedup_ratio']:.1f}x; trustworthiness "
        f"{res['islands']['trustworthiness_ours']:.4f} vs {res['islands']['trustworthiness_sklearn']:.4f}",
    ]
    return "\n".join(lines)


KEYS = ("train_speedup_vs_baseline_ratio", "time_to_fidelity_vs_baseline_ratio",
        "streaming_memory_growth_ratio", "student_fraction_of_bf16_peak", "cache_epoch_speedup_ratio",
        "islands_speedup_ratio", "dense_flops_vs_teacher_ratio_448")


PARTS = ("train", "inference", "cache", "fidelity", "islands")


# the headline figures, copied to the top of the results: (part, key)
HEADLINES = (("train", "train_speedup_vs_baseline_ratio"), ("dense", "dense_flops_vs_teacher_ratio_448"),
             ("fidelity", "time_to_fidelity_vs_baseline_ratio"), ("streaming", "streaming_memory_growth_ratio"),
             ("gpu", "student_fraction_of_bf16_peak"), ("cache", "cache_epoch_speedup_ratio"),
             ("islands", "islands_speedup_ratio"))


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Settings, Callable]:
    """The command line, the settings it chooses, and its parser's ``error``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--json", type=Path, required=True, help="where to write the figures")
    p.add_argument("--quick", action="store_true", help="fewer repetitions and steps (< 10 min on a 2-core CPU)")
    p.add_argument("--tiny", action="store_true", help="tiny models and sizes (tests)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON",
                   help="override a setting, e.g. sizes=[224,448] fid_budget_s=300")
    p.add_argument("--only", nargs="+", choices=PARTS, metavar="PART",
                   help=f"re-measure only these parts ({', '.join(PARTS)}) and update them in the "
                        "existing --json file, which keeps the others and records each part's command")
    args = p.parse_args(argv)
    if args.only and not args.json.is_file():
        p.error(f"--only updates an existing results file, and {args.json} does not exist: run the "
                "whole benchmark once first (without --only)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    s = Settings(**{**(CUDA if args.device == "cuda" else {}), **(QUICK if args.quick else {}),
                    **(TINY if args.tiny else {})})
    for kv in args.set:
        k, _, v = kv.partition("=")
        if not hasattr(s, k):
            p.error(f"--set: unknown setting {k!r}")
        setattr(s, k, json.loads(v))
    return args, s, p.error


def main(argv: list[str] | None = None) -> dict:
    args, s, error = parse_args(argv)
    device = torch.device(args.device)
    precision = default_precision(device)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", flush=True)

    mem = Memory(device)  # first: pins the allocator before anything large is allocated
    command = "python -m experiments.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    parts = args.only or PARTS
    res: dict = json.loads(args.json.read_text()) if args.only else {}
    if args.only and res["env"]["device"] != device.type:
        error(f"--only: {args.json} holds a {res['env']['device']} run; give --device {res['env']['device']}")
    res.setdefault("part_commands", {}).update({part: command for part in parts})
    res.update({"env": device_info(device), "settings": {**res.get("settings", {}), **asdict(s)},
                "precision_default": precision, "command": res.get("command", command)})
    if "train" in parts or "matmul" not in res:
        n = 256 if args.tiny else 2048
        res["matmul"] = {"fp32_gflops": matmul_rate(device, torch.float32, n) / 1e9,
                         "bf16_gflops": matmul_rate(device, torch.bfloat16, 256 if device.type == "cpu" else n) / 1e9}
    log(f"device {res['env']['cpu']}, default precision {precision}")
    if "train" in parts:
        log("1. training throughput (paper configuration)")
        res["train"] = bench_train(s, device, precision, log)
        res["gpu"] = bench_gpu(s, device, precision, res["train"])
    if "inference" in parts:
        log("2./3. dense and streaming inference")
        res["dense"], res["streaming"] = bench_inference(s, device, precision, mem, log)
    if "cache" in parts:
        log("5. epoch time with and without the teacher cache")
        res["cache"] = bench_cache(s, device, precision, log)
    if "fidelity" in parts:
        log("6. time to fidelity")
        res["fidelity"] = bench_fidelity(s, device, precision, log)
    if "islands" in parts:
        log("7. island-figure embedding")
        res["islands"] = bench_islands(s, device, log)
    res.update({key: res[part][key] for part, key in HEADLINES})
    res["total_s" if not args.only else "only_s"] = time.perf_counter() - t0
    print()
    print(table(res))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    write_results(args.json, res)
    return res


if __name__ == "__main__":
    main()
