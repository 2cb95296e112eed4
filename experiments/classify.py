"""The APM paper's evaluation on a CPU with random weights: per image, the CLIP teacher's zero-shot
prediction and the student's after test-time fitting, at several step counts; seconds per image
and teacher-student agreement, with the paper's protocol and with our warm start.

1. A labelled folder from real photographs: 8 classes (astronaut, cat, coffee mug, rocket,
   motorcycle, coins, moon, clock), each its scikit-image photograph, the photograph flipped
   left-right and its central 60% crop: 24 images.
2. A warm start: ``apm fit -c configs/apm.yaml -c configs/clip_smoke.yaml`` (clip_tiny at 224 px,
   a [256, 256] student) on the 7 other photographs.
3. ``apm classify`` with the 80 CLIP templates, once per condition: the paper's protocol (a fresh
   student per image, Adam 1e-4, raw MSE) with the smoke student and with apm.yaml's default
   student ([1024] x 4), our recipe from a fresh student, and our recipe from the distilled one.
   Only ``global`` is fitted. With ``--vit-b16``, also the paper's protocol with a random-weight
   CLIP ViT-B/16 teacher (OpenAI's architecture, QuickGELU) and apm.yaml's student, on one image
   per class.

Random weights make accuracy chance; what is measured is cost and agreement (does the student's
zero-shot answer equal the teacher's), which carry over to pretrained weights only as a check of
the machinery, not of the paper's numbers.

    python -m experiments.classify --json experiments/results/classify_cpu.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
import time
from pathlib import Path

import torch


from experiments.common import ROOT
from experiments import bench, common

from apm.cli import main as apm
from apm.data import skimage_photo

CLASSES = {"astronaut": "astronaut", "cat": "chelsea", "coffee mug": "coffee", "rocket": "rocket",
           "motorcycle": "stereo_motorcycle", "coins": "coins", "moon": "moon", "clock": "clock"}
TRAIN = "skimage:immunohistochemistry,hubble_deep_field,retina,camera,brick,grass,gravel"
CONFIGS = [str(ROOT / "configs" / "apm.yaml"), str(ROOT / "configs" / "clip_smoke.yaml")]


def labelled_folder(root: Path, views: bool = True) -> Path:
    """One folder per class: the photograph, flipped left-right, and its central 60% crop."""
    from PIL import ImageOps

    for name, photo in CLASSES.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        img = skimage_photo(photo)
        img.save(folder / f"{photo}.png")
        if views:
            ImageOps.mirror(img).save(folder / f"{photo}_flipped.png")
            w, h = img.size
            img.crop((int(0.2 * w), int(0.2 * h), int(0.8 * w), int(0.8 * h))).save(folder / f"{photo}_crop.png")
    return root


def distill(out: Path, steps: int) -> tuple[Path, float]:
    """The warm start: apm fit with apm.yaml + clip_smoke.yaml on the other photographs (kept in
    the work folder: a rerun there reuses it, and ``apm classify`` skips the images done)."""
    ckpt, record = out / "checkpoints" / "last.ckpt", out / "seconds.json"
    if ckpt.is_file() and record.is_file():
        return ckpt, json.loads(record.read_text())["seconds"]
    seconds = common.distill(out, CONFIGS, "--data.images", TRAIN, "--trainer.max_steps", str(steps)).seconds
    record.write_text(json.dumps({"seconds": seconds}))
    return ckpt, seconds


def classify(out: Path, data: Path, steps: list[int], source: list[str], extra: list[str]) -> dict:
    """One ``apm classify`` run; its summary with the wall time of the whole command."""
    start = time.perf_counter()
    assert apm(["classify", "--data", str(data), "--out", str(out), "--steps", *map(str, steps),
                "--device", "cpu", "--no-progress", *source, *extra]) == 0
    summary = json.loads((out / "summary.json").read_text())
    summary["command_seconds"] = round(time.perf_counter() - start, 1)
    # how concentrated the teacher's answers are: with random weights most images get one class,
    # which is what agreement at a partial fit has to be read against
    lines = [json.loads(x) for x in (out / "classify.jsonl").read_text().splitlines()]
    counts = Counter(x["teacher"] for x in lines)
    summary["teacher"]["classes_predicted"] = len(counts)
    summary["teacher"]["modal_share"] = round(max(counts.values()) / len(lines), 4)
    return summary


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, nargs="+", default=[0, 10, 20, 50, 100, 200, 500])
    p.add_argument("--distill-steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: tiny models gain nothing from a second thread on a shared machine)")
    p.add_argument("--vit-b16", action="store_true", help="also a random CLIP ViT-B/16 teacher")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=ROOT / "experiments" / "results" / "classify_cpu.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="apm_classify_"))
    data = labelled_folder(work / "data")
    ckpt, distill_seconds = distill(work / "distill", a.distill_steps)
    default_student = work / "default_student.yaml"  # apm.yaml's student over clip_smoke's teacher
    default_student.write_text("model:\n  hidden_dims: [1024, 1024, 1024, 1024]\n  pe_dim: 256\n  level_dim: 64\n")
    smoke = [f for c in CONFIGS for f in ("--config", c)]
    conditions = {
        "official_fresh": (smoke, ["--protocol", "official"]),
        "official_fresh_default_student": (smoke + ["--config", str(default_student)], ["--protocol", "official"]),
        "ours_fresh": (smoke, ["--protocol", "ours"]),
        "ours_warm": (["--ckpt", str(ckpt)], ["--protocol", "ours"]),
    }
    results: dict = {}
    for name, (source, extra) in conditions.items():
        print(f"== {name}", flush=True)
        results[name] = classify(work / name, data, a.steps, source, extra)
    if a.vit_b16:
        b16 = work / "vit_b16.yaml"
        b16.write_text("model:\n  teacher: clip\n  teacher_args: {model_name: ViT-B-16, weights: openai, "
                       "pretrained: false}\n  hidden_dims: [1024, 1024, 1024, 1024]\n  pe_dim: 256\n"
                       "  level_dim: 64\n  queries_per_image: 2048\ndata:\n  image_size: 224\n")
        small = labelled_folder(work / "data_one_view", views=False)
        print("== official_fresh_vit_b16", flush=True)
        results["official_fresh_vit_b16"] = classify(
            work / "vit_b16", small, [s for s in a.steps if s <= 200], ["--config", CONFIGS[0], "--config", str(b16)],
            ["--protocol", "official"])
    out = {
        "what": "apm classify on a CPU, random weights: 8 classes x 3 views of scikit-image photographs "
                "(24 images; the ViT-B/16 row: 8 images), CLIP's 80 templates, only 'global' fitted. "
                "Accuracy is chance with random weights; agreement = the student's zero-shot answer "
                "equals the teacher's. Seconds per image count from the image's teacher forward to "
                "the student's answer at that step count (image loading and the text side excluded).",
        "teacher": "clip_tiny at 224 px (3 blocks, 64 wide, 32-wide embedding)",
        "warm_start": {"command": "apm fit -c configs/apm.yaml -c configs/clip_smoke.yaml --data.images "
                                  f"{TRAIN} --trainer.max_steps {a.distill_steps}",
                       "seconds": round(distill_seconds, 1)},
        "steps": a.steps,
        "threads": a.threads,
        "env": bench.device_info(torch.device("cpu")),
        "conditions": results,
    }
    bench.write_results(a.json, out)
    return out


if __name__ == "__main__":
    main()
