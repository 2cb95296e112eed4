"""``apm perceive``: fit a student to each new image (test-time fitting)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from apm.analysis import island_figures, island_scores
from apm.commands.common import (IMAGES_HELP, parser, recipe_from_args, route_args, student_args,
                                 student_from_args)
from apm.checkpoints import write_student
from apm.data import load_images
from apm.errors import ConfigError
from apm.perceive import GRADIENT, FitRecipe, field_by_default, perceive_images
from apm.precision import pick_device
from apm.runlog import image_seed, resume
from teachers.base import select_levels


FLAG = {"queries_per_image": "queries"}  # FitRecipe's name -> this command's option


def build_parser() -> argparse.ArgumentParser:
    p = parser("perceive", "Test-time fitting: per image, a copy of the student is fitted to that "
                "image's teacher features. From --ckpt without a gradient setting, by the field route "
                "(--field: no gradient step, about a second; docs/field.md); otherwise by gradient steps "
                "until its mean R^2 over levels reaches --target-r2 or --max-steps. Per image it writes <out>/<image>.ckpt (the fitted student, weights only: every apm "
                "tool loads it, apm fit --ckpt_path does not), <image>_before.png and <image>_after.png (island figures), and "
                "one line of <out>/perceive.jsonl (steps, seconds, R^2 and ARI per level before and "
                "after). A rerun skips the images already in perceive.jsonl.")
    student_args(p, "a trained student (checkpoint of 'apm fit'); its weights are the start",
                 "LightningCLI config(s) giving teacher and student: alone, a fresh student; with "
                 "--ckpt, the settings the checkpoint must match")
    p.add_argument("--images", nargs="+", required=True, help=IMAGES_HELP)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--protocol", choices=("ours", "official"), default="ours",
                   help="ours: AdamW 1e-3, standardized MSE, sampled queries; official: the paper's "
                   "code (fresh random student, Adam 1e-4, raw MSE, every query each step)")
    p.add_argument("--init", choices=("trained", "fresh"), default=None,
                   help="start from the --ckpt student or a fresh random one (default: trained with "
                   "--ckpt, fresh with --config; official is always fresh)")
    p.add_argument("--target-r2", type=float, default=0.9, help="stop when the mean R^2 over levels reaches this")
    p.add_argument("--max-steps", type=int, default=500, help="stop after this many steps")
    p.add_argument("--lr", type=float, default=None, help="default 1e-3 (ours) or 1e-4 (official)")
    p.add_argument("--queries", type=int, default=None,
                   help="queries per image and step (ours); default the student's training setting")
    route_args(p)
    p.add_argument("--eval-every", type=int, default=10, help="steps between R^2 checks")
    p.add_argument("--levels", nargs="+", default=None,
                   help="fit, score and draw only these levels (names like block6 rgb, or indices); "
                   "default all. The target applies to their mean R^2")
    p.add_argument("--batch-size", type=int, default=1,
                   help="images fitted at once, each with its own student (same results as one at a "
                   "time; faster on a GPU, but the seconds recorded are the batch's)")
    p.add_argument("--figures", choices=("pca", "tsne", "none"), default="pca",
                   help="colouring of the before/after island figures, or none")
    p.add_argument("--k", type=int, default=8, help="k-means clusters for the ARI")
    p.add_argument("--seed", type=int, default=0,
                   help="each image is seeded with this plus a hash of its name (apm.runlog.image_seed)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, or auto")
    return p


def main(argv: list[str]) -> int:
    """``apm perceive``: fit a student to each new image (test-time fitting)."""
    a = build_parser().parse_args(argv)
    device = pick_device(a.device)
    module = student_from_args(a, "perceive", "a fresh student of that config's teacher", device)
    defaults = build_parser()
    asked = [k for k in (*GRADIENT, "eval_every")
             if getattr(a, FLAG.get(k, k)) != defaults.get_default(FLAG.get(k, k))]
    if a.field and set(asked) - {"moves", "solve_heads"}:  # those two FitRecipe refuses itself
        flags = ", ".join(f"'--{FLAG.get(k, k).replace('_', '-')}'" for k in asked)
        raise ConfigError(f"Settings '--field' and {flags}: the field route takes no gradient step, so "
                          f"{flags} would do nothing. Drop them, or use '--no-field' for the gradient fit.")
    if a.field is None:  # no route named: the field route from a trained student, unless a gradient setting is given
        a.field = field_by_default(a.protocol, a.init or ("trained" if a.ckpt else "fresh"), asked) or None
        if a.field:
            print("route: the field (no gradient step; --no-field for the gradient fit), docs/field.md")
    recipe = recipe_from_args(a, a.protocol, target_r2=a.target_r2, max_steps=a.max_steps,
                              eval_every=a.eval_every, levels=a.levels)
    levels = select_levels(module.levels, a.levels, "--levels")  # a bad level is named before any work
    images = load_images(a.images, module.hparams.image_size, skip_bad=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "perceive.jsonl"
    settings = {"source": str(Path(a.ckpt).resolve()) if a.ckpt else [str(Path(c).resolve()) for c in a.config],
                "protocol": recipe.protocol, "init": recipe.init, "lr": recipe.learning_rate(),
                "target_r2": a.target_r2, "max_steps": a.max_steps, "queries": a.queries,
                "eval_every": a.eval_every, "levels": a.levels, "k": a.k, "run_seed": a.seed,
                **recipe.route()}
    done = resume(log, settings, "apm perceive")
    todo = [(n, img) for n, img in images if n not in done]
    if done:
        print(f"skipping {len(images) - len(todo)} image(s) already in {log} (delete it to redo them)")
    steps = []
    for start in range(0, len(todo), max(1, a.batch_size)):
        names = ", ".join(n for n, _ in todo[start : start + max(1, a.batch_size)])
        print(f"fitting {names} ({start + 1} of {len(todo)}) ...", flush=True)
        for line in perceive_batch(module, todo[start : start + max(1, a.batch_size)], recipe, levels, a, out):
            line.update(settings)
            steps.append(line["steps"])
            with log.open("a") as f:
                f.write(json.dumps(line) + "\n")
    print(f"wrote {log}")
    if note := idle_route_note(recipe, steps):
        print(note)
    return 0


def idle_route_note(recipe: FitRecipe, steps: list[int]) -> str | None:
    """A one-line note when the solve of --solve-heads met the target on every image at step 1,
    so that the route's gradient-step flags (--moves, --resolve-every) did nothing."""
    idle = [f"--moves {recipe.moves}"] if recipe.moves != FitRecipe.moves else []
    idle += [f"--resolve-every {recipe.resolve_every}"] if recipe.resolve_every else []
    if not (recipe.solve_heads and steps and max(steps) <= 1 and idle):
        return None
    return (f"note: --target-r2 {recipe.target_r2:g} was met on every image by step {max(steps)} (step 1 "
            f"is the solve of --solve-heads), so no gradient step ran and {' and '.join(idle)} did "
            f"nothing; raise --target-r2 (e.g. 0.98) or drop them.")


def perceive_batch(module, part: list[tuple[str, torch.Tensor]], recipe: FitRecipe, levels: list[int],
                   a: argparse.Namespace, out: Path) -> list[dict]:
    """Fit ``part``'s images (name, image) at once; per image, save the fitted student, score and
    draw the islands before and after, print a line, and return its JSON record."""
    batch = torch.stack([img for _, img in part])
    with torch.no_grad():
        feats = module.targets(batch.to(module.device))  # the teacher runs once per image
    seeds = [image_seed(name, a.seed) for name, _ in part]
    lines = []
    for b, ((name, img), (before, after, rec)) in enumerate(
            zip(part, perceive_images(module, batch, seeds, recipe, features=feats))):
        mine = [f[b : b + 1] for f in feats]
        ckpt = out / f"{name}.ckpt"
        write_student(after, ckpt, extra=rec)
        line = {"image": name, **rec, "ckpt": str(ckpt)}
        for when, m in (("before", before), ("after", after)):
            scores = island_scores(m, img[None], levels, k=a.k, seed=a.seed, targets=mine)
            line[f"ari_{when}"] = {lvl: s["ari"][0] for lvl, s in scores.items()}
            if a.figures != "none":
                line[f"figure_{when}"] = str(island_figures(m, img[None], [f"{name}_{when}"], out, levels,
                                                            method=a.figures, seed=a.seed, k=a.k,
                                                            targets=mine)[0])
        reached = "reached" if rec["reached"] else "not reached"
        held = rec.get("r2_heldout")
        held = f", {sum(held.values()) / len(held):.3f} at held-out cells" if held else ""
        print(f"{name}: mean R^2 {rec['r2_mean_before']:.3f} -> {rec['r2_mean_after']:.3f} in "
              f"{rec['steps']} steps{held}, {rec['seconds']:.1f} s ({reached} {a.target_r2}) -> {ckpt}")
        lines.append(line)
    return lines
