"""``apm classify``: zero-shot classification of a labelled folder after test-time fitting."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from apm.classify import (GLOBAL, LOG_NAME, SUMMARY_NAME, classification_inputs, classification_recipe,
                          classify_folder, global_among_fitted, format_table, summarize)
from apm.commands.common import parser, recipe_from_args, route_args, student_args
from apm.errors import ConfigError
from apm.cli import load_student
from apm.precision import pick_device
from teachers.clip import imagenet_templates, text_classifier


def build_parser() -> argparse.ArgumentParser:
    p = parser(
        "classify", "The APM paper's evaluation: per image of a labelled folder (one subfolder per "
        "class), the CLIP teacher's zero-shot prediction, then a student fitted to that image's "
        "teacher features, whose answer for the 'global' level (the image embedding) is classified "
        "the same way after each of --steps. Writes <out>/classify.jsonl (one line per image, as it "
        "goes; a rerun skips the images already there) and <out>/summary.json, and prints the "
        "table: accuracy of the teacher and of the student at each step count, their agreement, "
        "the student's R^2 on global, seconds per image.")
    p.add_argument("--data", required=True, help="labelled folder: one subfolder of images per class")
    p.add_argument("--out", required=True, help="output folder")
    student_args(p, "a trained student with a CLIP teacher: the warm start (--init trained)",
                 "LightningCLI config(s) with a CLIP teacher: alone, a fresh student per image; with "
                 "--ckpt, the settings the checkpoint must match")
    p.add_argument("--classes", default=None,
                   help="class names: a JSON object or a text file of 'FOLDER NAME' lines, or "
                   "'imagenet' (wnid or 0..999 folders -> CLIP's ImageNet names); default the folder names")
    p.add_argument("--templates", default=None,
                   help="prompt templates, one a line with '{}' for the class name; default CLIP's 80")
    p.add_argument("--steps", type=int, nargs="+", default=[0, 10, 50, 200],
                   help="step counts at which the student's prediction is read (one fit per image)")
    p.add_argument("--levels", nargs="+", default=[GLOBAL],
                   help="levels the student is fitted to (must include global)")
    p.add_argument("--protocol", choices=("ours", "official"), default=None,
                   help="official: the paper's code (fresh random student, Adam 1e-4, raw MSE); "
                   "ours: AdamW 1e-3 on standardized levels (default: ours with --ckpt, official "
                   "with --config alone)")
    p.add_argument("--init", choices=("trained", "fresh"), default=None,
                   help="start from the --ckpt student or a fresh one (default: trained with --ckpt, "
                   "fresh with --config alone; official is always fresh)")
    p.add_argument("--lr", type=float, default=None, help="default 1e-3 (ours) or 1e-4 (official)")
    p.add_argument("--queries", type=int, default=None,
                   help="queries per image and step (ours); default the student's training setting")
    route_args(p)
    p.add_argument("--batch-size", type=int, default=1,
                   help="images fitted at once, each with its own student (the same students; the "
                   "seconds recorded are the batch's share)")
    p.add_argument("--seed", type=int, default=0,
                   help="each image is seeded with this plus a hash of its path in the folder")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, or auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str]) -> int:
    """``apm classify``: zero-shot classification of a labelled folder after test-time fitting."""
    a = build_parser().parse_args(argv)
    if not a.ckpt and not a.config:
        raise ConfigError("apm classify needs --ckpt (a trained student with a CLIP teacher, the warm "
                          "start) or --config (a fresh student per image, e.g. --config configs/apm.yaml "
                          "--config configs/clip.yaml).")
    if a.field:
        raise ConfigError("Setting '--field': apm classify scores the fitted student at gradient steps "
                          "(--steps), and the field route takes none (at the grid's cells it answers the "
                          "teacher itself). Drop '--field'.")
    recipe = recipe_from_args(a, a.protocol or ("ours" if a.ckpt else "official"))
    steps = sorted(set(a.steps))
    settings = {"protocol": recipe.protocol, "init": recipe.init, "steps": steps,
                "levels": list(a.levels), "lr": recipe.learning_rate(), "queries": a.queries,
                "ckpt": str(Path(a.ckpt).resolve()) if a.ckpt else None,
                "config": [str(Path(c).resolve()) for c in a.config or []], "run_seed": a.seed,
                **recipe.route()}
    out = Path(a.out)
    log = out / LOG_NAME
    folder, templates = classification_inputs(a.data, a.classes, a.templates, a.steps, log, settings)

    device = pick_device(a.device)
    module = load_student(a.ckpt, a.config, device)  # with both: the checkpoint must fit the configs
    global_among_fitted(module, a.levels)  # a CLIP teacher, and global among the levels fitted
    recipe = classification_recipe(recipe, steps, a.levels)
    module.teacher.to(device)
    templates = templates or list(imagenet_templates())
    print(f"{len(folder.items)} images in {len(folder.folders)} classes; encoding "
          f"{len(folder.names)} x {len(templates)} prompts")
    classifier = text_classifier(module.teacher, folder.names, templates)
    out.mkdir(parents=True, exist_ok=True)
    lines, skipped = classify_folder(module, folder, classifier, recipe, steps, log, settings,
                                     a.seed, a.batch_size, progress=not a.no_progress)
    summary = summarize(lines, steps)
    summary.update(classes=len(folder.folders), skipped=skipped, data=str(folder.root),
                   source=str(a.ckpt or a.config), templates=len(templates),
                   **settings)
    print(format_table(summary))
    (out / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {log} and {out / SUMMARY_NAME}")
    return 0
