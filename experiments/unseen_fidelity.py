"""What raises a distilled student's fidelity on photographs it never saw, before any fitting?

Variants of one small recipe, each distilled for the same number of steps through the real CLI
(random DINOv2-small with layer scale 1.0, 224 px, every block + rgb), then scored with the
measures of ``apm eval`` (R^2 per level, k-means ARI) on held-out photographs and on training ones:

- ``baseline``: the paper's single column filter, the training photographs as they are;
- ``filters8``: ``model.column_filters: 8`` (8 numbers per patch in the trigger column);
- ``augment``: ``data.hflip`` and ``data.crop_scale: [0.35, 1]`` (random resized crops);
- ``wider``: the MLP twice as wide;
- ``more_images``: four times the training photographs.

    python -m experiments.unseen_fidelity --images FOLDER --json experiments/results/unseen_fidelity_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


from experiments.common import ROOT
from experiments import bench, common

from apm.analysis import island_scores
from apm.cli import load_student
from apm.data import find_images, read_image

TEACHER_ARGS = {"pretrained": False, "config_overrides": {"layerscale_value": 1.0}}


def distill(train_dir: Path, out: Path, steps: int, hidden: list[int], extra: list[str]) -> tuple[Path, float]:
    run = common.distill(out, [ROOT / "configs" / "apm.yaml"], "--data.images", str(train_dir),
                         "--data.image_size", "224", "--data.num_workers", "0", "--model.teacher", "dinov2_small",
                         "--model.teacher_args", json.dumps(TEACHER_ARGS), "--model.student.hidden_dims",
                         json.dumps(hidden), "--model.warmup_steps", "50", "--trainer.max_steps", str(steps),
                         "--trainer.accelerator", "cpu", *extra)
    return run.ckpt, run.seconds


def score(ckpt: Path, images: list[tuple[str, torch.Tensor]]) -> dict:
    module = load_student(str(ckpt), device=torch.device("cpu"))
    per = {n: island_scores(module, img[None], k=8) for n, img in images}
    levels = list(next(iter(per.values())))
    r2 = {l: statistics.mean(per[n][l]["r2"][0] for n in per) for l in levels}
    ari = {l: statistics.mean(per[n][l]["ari"][0] for n in per) for l in levels}
    return {"r2_mean": statistics.mean(r2.values()), "ari_mean": statistics.mean(ari.values()),
            "r2": r2, "ari": ari}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", required=True, help="a folder of photographs")
    p.add_argument("--train", type=int, default=16, help="training photographs (more_images: 4x)")
    p.add_argument("--unseen", type=int, default=8)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--hidden", type=json.loads, default=[256, 256, 256, 256])
    p.add_argument("--variants", nargs="+", default=["baseline", "filters8", "augment", "wider", "more_images"])
    p.add_argument("--json", type=Path, default=ROOT / "experiments" / "results" / "unseen_fidelity_cpu.json")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    files = find_images(Path(a.images))
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(0)).tolist()
    files = [files[i] for i in order]
    unseen, pool = files[-a.unseen:], files[: -a.unseen]
    work = Path(tempfile.mkdtemp(prefix="apm_unseen_"))
    held_out = [(f.stem, read_image(f, 224)) for f in unseen]
    variants = {
        "baseline": (a.train, a.hidden, []),
        "filters8": (a.train, a.hidden, ["--model.column_filters", "8"]),
        "augment": (a.train, a.hidden, ["--data.hflip", "true", "--data.crop_scale", "[0.35, 1.0]"]),
        "wider": (a.train, [2 * h for h in a.hidden], []),
        "more_images": (min(4 * a.train, len(pool)), a.hidden, []),
    }
    results = {}
    for name in a.variants:
        n_train, hidden, extra = variants[name]
        train_dir = work / f"train{n_train}"
        if not train_dir.exists():
            train_dir.mkdir(parents=True)
            for f in pool[:n_train]:
                (train_dir / f.name).symlink_to(f.resolve())
        ckpt, seconds = distill(train_dir, work / name, a.steps, hidden, extra)
        seen = [(f.stem, read_image(f, 224)) for f in pool[: min(8, n_train)]]
        results[name] = {"train_images": n_train, "hidden_dims": hidden, "settings": extra,
                         "train_seconds": round(seconds, 1), "unseen": score(ckpt, held_out),
                         "seen": score(ckpt, seen)}
        r = results[name]
        print(f"[{time.perf_counter() - t0:7.1f} s] {name:12s} unseen R^2 {r['unseen']['r2_mean']:.3f} "
              f"ARI {r['unseen']['ari_mean']:.3f} | training photos R^2 {r['seen']['r2_mean']:.3f} "
              f"({seconds:.0f} s)", flush=True)
    res = {"command": "python -m experiments.unseen_fidelity " + " ".join(argv if argv is not None else sys.argv[1:]),
           "env": bench.device_info(torch.device("cpu")), "teacher": "dinov2_small", "teacher_args": TEACHER_ARGS,
           "image_size": 224, "steps": a.steps, "unseen_images": [n for n, _ in held_out], "variants": results}
    bench.write_results(a.json, res)
    return res


if __name__ == "__main__":
    main()
