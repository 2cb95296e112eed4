"""The benchmark script runs end to end at tiny sizes and writes every figure it promises."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}

TOP = ("train_speedup_vs_baseline_ratio", "time_to_fidelity_vs_baseline_ratio",
       "streaming_memory_growth_ratio", "student_fraction_of_bf16_peak", "cache_epoch_speedup_ratio",
       "islands_speedup_ratio", "dense_flops_vs_teacher_ratio_448")
TRAIN = ("queries_per_s_ours", "queries_per_s_baseline", "images_per_s_ours", "images_per_s_baseline",
         "flops_per_step_ours", "flops_per_step_baseline", "first_layer_flop_share_baseline")
DENSE = ("image", "locations", "student_flops", "teacher_flops", "student_s", "teacher_s",
         "student_peak_bytes", "teacher_peak_bytes")


def vit_flops(size: int, width: int = 32, blocks: int = 3, mlp_ratio: int = 2, patch: int = 14) -> int:
    """Multiply-adds x 2 of a ViT on one image: patch embedding, then per block the q, k, v and
    output projections, the two attention products over patches + CLS, and the MLP."""
    patches = (size // patch) ** 2
    n, d = patches + 1, width
    block = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * mlp_ratio * d
    return 2 * patches * 3 * patch * patch * d + blocks * block


@pytest.mark.slow
def test_bench_tiny_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "experiments.bench", "--device", "cpu",
                          "--tiny", "--json", str(out)], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env=RUN_ENV)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "1. training throughput" in run.stdout and "6. time to mean R^2" in run.stdout  # the table
    res = json.loads(out.read_text())
    for k in TOP:
        assert k in res, k
    assert res["student_fraction_of_bf16_peak"] is None  # GPU-only figure on CPU
    assert math.isfinite(res["train_speedup_vs_baseline_ratio"]) and res["train_speedup_vs_baseline_ratio"] > 0
    assert res["streaming"]["memory_method"]  # says how memory was measured
    for k in TRAIN:
        assert res["train"][k] > 0, k
    assert res["train"]["flops_per_step_baseline"] > res["train"]["flops_per_step_ours"]  # less work
    assert [r["image"] for r in res["dense"]["sizes"]] == [28, 56]
    assert res["dense_flops_vs_teacher_ratio_448"] is None  # 448 px is not among the tiny sizes
    for row in res["dense"]["sizes"]:
        for k in DENSE:
            assert row[k] is not None, k
        first, late = row["designs"]["first"], row["designs"]["late"]
        assert late["flops"] < first["flops"] and late["s"] > 0 and first["s"] > 0
        # the teacher's count against a hand count of the tiny DINOv2 (width 32, 3 blocks, MLP x2)
        assert row["teacher_flops"] == vit_flops(row["image"])
        assert row["student_flops"] == row["designs"][res["dense"]["level_entry"]]["flops"]
    assert {"epoch_s_no_cache", "epoch_s_cache_fill", "epoch_s_cached"} <= set(res["cache"])
    assert {"ours", "official", "target_r2"} <= set(res["fidelity"])
    designs = res["fidelity"]["designs"]
    assert set(designs) == {"first", "late"} and all(d["steps"] > 0 for d in designs.values())
    assert "our recipe by student design" in run.stdout
    isl = res["islands"]
    assert "7. island figure" in run.stdout
    assert isl["level_s_ours"] > 0 and isl["level_s_sklearn"] > 0
    assert 0.5 < isl["trustworthiness_ours"] <= 1 and 0.5 < isl["trustworthiness_sklearn"] <= 1
    assert res["env"]["torch"] and res["command"].startswith("python -m experiments.bench")

    # --only re-measures one part in place and keeps the others as they were
    again = subprocess.run([sys.executable, "-m", "experiments.bench", "--device", "cpu",
                            "--tiny", "--json", str(out), "--only", "islands"], capture_output=True,
                           text=True, timeout=300, cwd=tmp_path, env=RUN_ENV)
    assert again.returncode == 0, again.stderr[-3000:]
    updated = json.loads(out.read_text())
    assert updated["train"] == res["train"] and updated["fidelity"] == res["fidelity"]
    ran = again.stdout.split("\n\n")[0]  # the progress log, before the table
    assert "7. island-figure embedding" in ran and "1. training throughput" not in ran  # that part alone
    assert updated["part_commands"]["islands"].endswith("--only islands")
    assert updated["part_commands"]["train"] == res["command"]
    missing = subprocess.run([sys.executable, "-m", "experiments.bench", "--device", "cpu",
                              "--tiny", "--json", str(tmp_path / "none.json"), "--only", "islands"],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path, env=RUN_ENV)
    assert missing.returncode == 2 and "run the whole benchmark once first" in missing.stderr
