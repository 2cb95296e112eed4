"""Where should the level code enter? Both student designs (``level_entry`` first and late) side by
side: dense all-level inference FLOPs and time against the teacher at 224, 448, 896 px, and the
time-to-fidelity race on one photograph. Only bench.py's figures 2 and 6, without the rest.

    python -m experiments.level_entry      # about 3 minutes on 2 CPU cores

Writes experiments/results/level_entry_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


from experiments.common import ROOT
from experiments import bench

RUN = ("seconds", "steps", "train_s", "final_r2")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, default=ROOT / "experiments" / "results" / "level_entry_cpu.json")
    p.add_argument("--fid-image", type=int, default=224)
    p.add_argument("--fid-hidden", type=json.loads, default=[512, 512, 512, 512])
    p.add_argument("--fid-budget-s", type=float, default=120.0)
    args = p.parse_args(argv)
    device = torch.device("cpu")
    precision = bench.default_precision(device)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", flush=True)

    s = bench.Settings(infer_reps=1, fid_image=args.fid_image, fid_hidden=args.fid_hidden,
                       fid_budget_s=args.fid_budget_s)
    dense, _ = bench.bench_inference(s, device, precision, bench.Memory(device), log)
    fid = bench.bench_fidelity(s, device, precision, log)
    res = {"command": "python -m experiments.level_entry " + " ".join(argv or sys.argv[1:]),
           "env": bench.device_info(device), "default_level_entry": bench.DEFAULT_LEVEL_ENTRY,
           "dense_flops_vs_teacher_ratio_448": dense["dense_flops_vs_teacher_ratio_448"],
           "dense": [{k: r[k] for k in ("image", "locations", "levels", "teacher_flops", "teacher_s",
                                         "designs")} for r in dense["sizes"]],
           "fidelity": {**{k: fid[k] for k in ("image", "teacher_levels", "levels", "student_hidden",
                                               "target_r2", "budget_s")},
                        "designs": {e: {k: v[k] for k in RUN} for e, v in fid["designs"].items()},
                        "official": {k: fid["official"][k] for k in RUN}}}
    for r in res["dense"]:
        log(f"{r['image']} px: teacher {r['teacher_flops'] / 1e9:.1f} GFLOP {r['teacher_s']:.2f} s; " + ", ".join(
            f"{e} {v['flops'] / 1e9:.1f} GFLOP {v['s']:.2f} s" for e, v in r["designs"].items()))
    log("time to R^2 {}: ".format(s.fid_target) + ", ".join(
        f"{e} {v['seconds']} s ({v['steps']} steps)" for e, v in {**res["fidelity"]["designs"],
                                                                 "official": res["fidelity"]["official"]}.items()))
    bench.write_results(args.json, res)
    return res


if __name__ == "__main__":
    main()
