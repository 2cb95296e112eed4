"""One student for two teachers, or one student each? DINOv2-small (blocks 4, 8, 12) and MViTv2-S
(blocks 2, 3) distilled into one student (``model.teachers``), against two one-teacher students of
the same size, on two scikit-image photographs, all on the same clock.

    python -m experiments.multi_teacher      # about 7 minutes on 2 CPU cores

Both teachers have random weights (offline; DINOv2 with layer scale 1.0 so its blocks are not
near-identity), at 224 px: DINOv2 on its 16x16 grid (width 384), MViTv2 on its 28x28 stride-8 grid
(width 192), 16 frames. The students share one architecture (MLP, codes, 14-pixel column filter,
late level entry) and one recipe: every location of every level each step, the teachers' features
computed once and held in memory, AdamW at 1e-3 with a 20-step warm-up and a cosine decay to 5% over
the student's time budget (configs/apm.yaml's schedule, on a clock instead of a step count: each
student's learning rate follows its own training seconds). Five students train in lockstep (a few
steps each in turn, each on its own clock, so load from elsewhere slows all alike): the joint student
for the budget T; each one-teacher student for T (equal time per student: the pair costs 2T) and,
from the same initial weights, for T/2 (equal total time: the pair shares T). Fidelity is R^2 per
level on the training photographs (the teacher's scale) at the end of each budget. Cost: parameters,
FLOPs and seconds of one training step, and of dense inference of every level of one image, for the
one student and for the two. One thread: on a shared 2-core machine, two threads ran steps 20-40x
slower whenever another process held a core.

Writes experiments/results/multi_teacher.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch


from experiments.common import ROOT
from experiments import bench
from apm import metrics
from apm.data import image_transform, skimage_photo
from apm.module import APMModule

PHOTOS = ("astronaut", "coffee")
DINO = {"name": "dinov2_small", "args": {"pretrained": False, "levels": [4, 8, 12],
                                          "config_overrides": {"layerscale_value": 1.0}}}
MVIT = {"name": "mvitv2_s", "args": {"pretrained": False, "levels": [2, 3]}}
PREFIX = {"dinov2": "dinov2_small/", "mvitv2": "mvitv2_s/"}
LR, WARMUP, MIN_LR_RATIO = 1e-3, 20, 0.05


def student(kind: str, size: int, hidden: list[int]) -> APMModule:
    """The joint student (``kind`` "joint") or a one-teacher one ("dinov2", "mvitv2"), all of one
    architecture and, per kind, the same initial weights; the one-teacher students go through
    ``model.teacher`` (the path every run took before ``model.teachers``)."""
    kw = dict(image_size=size, patch_size=14, hidden_dims=hidden, pe_dim=128, level_dim=32,
              queries_per_image=0, stats_images=len(PHOTOS))
    torch.manual_seed(0)
    if kind == "joint":
        return APMModule(teachers=[DINO, MVIT], **kw)
    spec = DINO if kind == "dinov2" else MVIT
    return APMModule(teacher=spec["name"], teacher_args=spec["args"], **kw)


def level_key(kind: str, name: str) -> str:
    """A level's name in the joint student's terms (the one-teacher students' are unprefixed)."""
    return name if name == "rgb" or "/" in name else PREFIX[kind] + name


def r2_per_level(module: APMModule, images: torch.Tensor, feats: list[torch.Tensor]) -> dict[str, float]:
    """R^2 per level (mean over the images) on the teacher's scale."""
    with torch.no_grad():
        preds = module.predict_features(images)
    return {l.name: float(metrics.r2(p, t).mean()) for l, p, t in zip(module.levels, preds, feats)}


def learning_rate(seconds: float, step: int, budget: float) -> float:
    """Warm-up over steps, then cosine decay to MIN_LR_RATIO over the time budget."""
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    t = min(1.0, seconds / budget)
    return LR * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * t)))


def race(runs: dict[str, dict], images: torch.Tensor, eval_every: int, log) -> dict[str, dict]:
    """Train every run (``module``, ``kind``, ``feats``, ``budget``) on its own clock until its
    budget is spent, in lockstep; R^2 per level every ``eval_every`` steps."""
    device = images.device
    for r in runs.values():
        r.update(opt=torch.optim.AdamW(r["module"].student.parameters(), lr=LR), steps=0,
                 train_s=0.0, curve=[])
        r["module"].train()

    def step(r: dict) -> None:
        for g in r["opt"].param_groups:
            g["lr"] = learning_rate(r["train_s"], r["steps"], r["budget"])
        loss, _ = r["module"].distillation_loss(images, r["feats"])
        r["opt"].zero_grad(set_to_none=True)
        loss.backward()
        r["opt"].step()

    while True:
        live = [r for r in runs.values() if r["train_s"] < r["budget"]]
        if not live:
            break
        for r in live:
            for _ in range(eval_every):
                r["train_s"] += bench.wall(lambda: step(r), device)
                r["steps"] += 1
            r2 = {level_key(r["kind"], n): round(v, 4)
                  for n, v in r2_per_level(r["module"], images, r["feats"]).items()}
            r["curve"].append({"steps": r["steps"], "train_s": round(r["train_s"], 2), "r2": r2})
        log("  " + ", ".join(f"{k}: {r['steps']} steps {r['train_s']:.0f} s R^2 "
                             f"{statistics.mean(r['curve'][-1]['r2'].values()):.3f}"
                             for k, r in runs.items()))
    return {k: {"steps": r["steps"], "train_s": round(r["train_s"], 2), "budget_s": r["budget"],
                "final_r2": r["curve"][-1]["r2"], "curve": r["curve"]} for k, r in runs.items()}


def costs(modules: dict[str, APMModule], images: torch.Tensor, feats: dict[str, list[torch.Tensor]],
          reps: int) -> dict[str, dict]:
    """Parameters; FLOPs and median seconds of a training step (forward and backward, the batch)
    and of dense inference of every level of one image."""
    device = images.device
    out = {}
    for k, m in modules.items():
        def train_step():
            loss, _ = m.distillation_loss(images, feats[k])
            loss.backward()
            m.student.zero_grad(set_to_none=True)

        def dense():
            with torch.no_grad():
                m.student.dense(images[:1])

        out[k] = {"params": sum(p.numel() for p in m.student.parameters()),
                  "levels": [l.name for l in m.levels],
                  "train_step_flops": bench.count_flops(train_step),
                  "train_step_s": round(bench.median_time(train_step, device, reps), 4),
                  "dense_flops": bench.count_flops(dense),
                  "dense_s": round(bench.median_time(dense, device, reps), 4)}
    return out


def spatial_spread(levels, feats: list[torch.Tensor]) -> dict[str, float]:
    """Per level, the share of its second moment that varies over locations (what R^2 measures)."""
    spread = {}
    for l, f in zip(levels, feats):
        x = f.flatten(1, 2)
        spread[l.name] = round(float(x.var(1).sum(-1).mean() / x.pow(2).mean(1).sum(-1).mean()), 3)
    return spread


def contenders(modules: dict, feats: dict, budget: float, image: int, hidden: list[int]) -> dict:
    """The joint and the single-teacher students for the whole budget, and the single-teacher
    ones again (the same initial student) for half of it."""
    runs = {k: {"module": m, "kind": k, "feats": feats[k], "budget": budget} for k, m in modules.items()}
    for k in ("dinov2", "mvitv2"):
        half = student(k, image, hidden)
        half.standardizer.load_state_dict(modules[k].standardizer.state_dict())
        runs[f"{k}_half"] = {"module": half, "kind": k, "feats": feats[k], "budget": budget / 2}
    return runs


def level_table(final: dict[str, dict[str, float]]) -> tuple[dict, dict]:
    """Per level, the final R^2 of the joint student and of the level's own student (for T and
    T/2; every student for rgb), and their means over the teacher levels."""
    per_level = {}
    for name in final["joint"]:
        owner = next((k for k, pre in PREFIX.items() if name.startswith(pre)), None)
        if owner:
            per_level[name] = {"joint": final["joint"][name], "own_T": final[owner][name],
                               "own_T/2": final[f"{owner}_half"][name]}
        else:  # rgb: every student predicts it
            per_level[name] = {k: final[k][name] for k in final}
    teacher_levels = [n for n in per_level if n != "rgb"]
    mean = {k: round(statistics.mean(per_level[n][k] for n in teacher_levels), 4)
            for k in ("joint", "own_T", "own_T/2")}
    return per_level, mean


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, default=ROOT / "experiments" / "results" / "multi_teacher.json")
    p.add_argument("--image", type=int, default=224)
    p.add_argument("--hidden", type=json.loads, default=[256, 256])
    p.add_argument("--budget-s", type=float, default=100.0, help="training seconds of the joint student")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--reps", type=int, default=5, help="repetitions of the timed cost measurements")
    p.add_argument("--threads", type=int, default=1, help="torch threads (see the module docstring)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", flush=True)

    warnings.simplefilter("ignore")
    load_start = os.getloadavg()  # other work on the machine slows every student alike (lockstep)
    tf = image_transform(args.image)
    images = torch.stack([tf(skimage_photo(n)) for n in PHOTOS]).to(device)
    modules = {k: student(k, args.image, args.hidden) for k in ("joint", "dinov2", "mvitv2")}
    feats, teacher_s = {}, {}
    for k, m in modules.items():
        m.fit_statistics([images])
        teacher_s[k] = round(bench.wall(lambda: feats.__setitem__(k, m.targets(images)), device), 2)
    for a, b in zip(feats["joint"], feats["dinov2"][:-1] + feats["mvitv2"]):  # the very same targets
        assert torch.equal(a, b)
    log("teachers: " + ", ".join(f"{k} {s} s" for k, s in teacher_s.items()))
    spread = spatial_spread(modules["joint"].levels, feats["joint"])

    cost = costs(modules, images, feats, args.reps)
    log("costs: " + ", ".join(f"{k} {c['params'] / 1e6:.2f} M params, step {c['train_step_s']:.3f} s "
                              f"{c['train_step_flops'] / 1e9:.1f} GFLOP" for k, c in cost.items()))

    T = args.budget_s
    runs = contenders(modules, feats, T, args.image, args.hidden)
    res_runs = race(runs, images, args.eval_every, log)

    per_level, mean = level_table({k: r["final_r2"] for k, r in res_runs.items()})
    pair = {k: cost["dinov2"][k] + cost["mvitv2"][k] for k in ("params", "train_step_flops", "dense_flops")}
    pair.update({k: round(cost["dinov2"][k] + cost["mvitv2"][k], 4) for k in ("train_step_s", "dense_s")})
    res = {
        "command": "python -m experiments.multi_teacher " + " ".join(argv if argv is not None else sys.argv[1:]),
        "env": bench.device_info(device), "threads": torch.get_num_threads(),
        "load_average_start": load_start, "photos": list(PHOTOS), "image": args.image,
        "teachers": [DINO, MVIT],
        "student": {"hidden_dims": args.hidden, "pe_dim": 128, "level_dim": 32, "patch_size": 14,
                    "level_entry": modules["joint"].student_settings.level_entry, "queries_per_image": "all"},
        "recipe": {"lr": LR, "warmup_steps": WARMUP, "min_lr_ratio": MIN_LR_RATIO,
                   "schedule": "cosine over each student's own training seconds"},
        "budget_s": T, "teacher_s": teacher_s, "spatial_variance_fraction": spread,
        "runs": {k: {x: r[x] for x in ("steps", "train_s", "budget_s")} for k, r in res_runs.items()},
        "r2": per_level, "mean_teacher_r2": mean,
        "cost": {**cost, "pair": pair,
                 "joint_over_pair": {k: round(cost["joint"][k] / pair[k], 3) for k in pair}},
        "curves": {k: r["curve"] for k, r in res_runs.items()},
        "load_average_end": os.getloadavg(),
    }
    log("R^2 per level (joint for T | own student for T | own student for T/2):")
    for n, row in per_level.items():
        log(f"  {n:22s} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()))
    log(f"mean over teacher levels: {mean}")
    log(f"joint / pair: {res['cost']['joint_over_pair']}")
    bench.write_results(args.json, res)
    return res


if __name__ == "__main__":
    main()
