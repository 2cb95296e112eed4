"""The commands beside ``apm fit``: ``apm islands``, ``apm eval``, ``apm interpolate`` and ``apm perceive``.

Each ``*_main`` takes the argument list after the subcommand name (see ``apm.cli.TOOLS``), parses
it, prints and returns the exit status; the work is done by ``apm.analysis``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from apm.analysis import (format_table, interpolation_strip, island_figures, island_scores,
                          load_images, load_trained_module, pick_device, resolve_levels,
                          summarize, teacher_figures, teacher_from_config)
from apm.errors import ConfigError


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"apm {prog}", description=description,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def _embedding_args(p: argparse.ArgumentParser, method: str = "tsne") -> None:
    p.add_argument("--levels", nargs="+", default=None,
                   help="levels to show, by name (block1, rgb, ...) or index; default all")
    p.add_argument("--method", choices=("tsne", "pca"), default=method,
                   help="embedding of features into RGB: joint t-SNE, or the first 3 principal components")
    p.add_argument("--perplexity", type=float, default=30.0, help="t-SNE perplexity")
    p.add_argument("--seed", type=int, default=0, help="seed of t-SNE, PCA and k-means")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, or auto")


def islands_main(argv: list[str]) -> int:
    """``apm islands``: island figures per image, a row per level."""
    p = _parser("islands", "Island figures: for each image a PNG with a row per level and columns "
                "input | teacher islands | student islands. Teacher and student features of one "
                "level are embedded together by t-SNE into 3 components shown as RGB, so one colour "
                "is one place in one embedding. Without --ckpt, --config gives a teacher alone.")
    p.add_argument("--ckpt", help="checkpoint written by 'apm fit'")
    p.add_argument("--config", action="append", default=None,
                   help="without --ckpt: LightningCLI config(s) naming the teacher (repeat to layer)")
    p.add_argument("--images", nargs="+", required=True,
                   help="image files, folders, or skimage:NAME[,NAME...] (embedded photographs)")
    p.add_argument("--out", required=True, help="output folder; one <image>.png per image")
    p.add_argument("--k", type=int, default=8, help="k-means clusters for the ARI in the row labels")
    p.add_argument("--max-iter", type=int, default=1000, help="t-SNE iterations")
    p.add_argument("--display", type=int, default=192, help="pixels per panel")
    _embedding_args(p)
    a = p.parse_args(argv)
    device = pick_device(a.device)
    if a.ckpt:
        module = load_trained_module(a.ckpt, device)
        images = load_images(a.images, module.hparams.image_size)
        levels = resolve_levels([l.name for l in module.levels], a.levels)
        paths = []
        for name, img in images:  # one at a time: t-SNE dominates and memory stays flat
            paths += island_figures(module, img[None], [name], a.out, levels, a.method, a.perplexity,
                                    a.seed, a.k, a.max_iter, a.display)
    elif a.config:
        teacher, size = teacher_from_config(a.config, device)
        images = load_images(a.images, size)
        levels = resolve_levels([l.name for l in teacher.levels], a.levels)
        paths = []
        for name, img in images:
            paths += teacher_figures(teacher, img[None], [name], a.out, levels, a.method,
                                     a.perplexity, a.seed, a.max_iter, a.display)
    else:
        raise ConfigError("apm islands needs --ckpt (teacher and student) or --config (teacher only, "
                          "e.g. --config configs/apm.yaml).")
    for path in paths:
        print(path)
    return 0


def eval_main(argv: list[str]) -> int:
    """``apm eval``: fidelity and island agreement per level, as a table and a JSON file."""
    p = _parser("eval", "Per level: mean cosine, centred cosine, R^2 (teacher's scale), MSE "
                "(standardized), and island agreement (k-means on teacher and on student features, "
                "ARI and NMI between the label maps) with its chance baseline (ari_control, "
                "nmi_control: each image's student against the next image's teacher, or with one "
                "image against its teacher flipped left-right); means over images, then over levels.")
    p.add_argument("--ckpt", required=True, help="checkpoint written by 'apm fit'")
    p.add_argument("--images", nargs="+", required=True,
                   help="image files, folders, or skimage:NAME[,NAME...] (embedded photographs)")
    p.add_argument("--json", required=True, help="output JSON file")
    p.add_argument("--k", type=int, default=8, help="k-means clusters")
    p.add_argument("--levels", nargs="+", default=None, help="levels by name or index; default all")
    p.add_argument("--seed", type=int, default=0, help="k-means seed")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, or auto")
    a = p.parse_args(argv)
    if a.k < 2:
        raise ConfigError(f"Setting '--k': {a.k} clusters cannot disagree; use 2 or more (default 8).")
    module = load_trained_module(a.ckpt, pick_device(a.device))
    images = load_images(a.images, module.hparams.image_size)
    levels = resolve_levels([l.name for l in module.levels], a.levels)
    per_image: dict[str, dict[str, list[float]]] = {}
    count = len(images)
    for start in range(0, count, a.batch_size):
        end = min(start + a.batch_size, count)
        batch = torch.stack([img for _, img in images[start:end]])
        # the control of image i is image (i + 1) mod count: a batch's last needs the next batch's first
        following = None if end - start == count else images[end % count][1]
        for name, ms in island_scores(module, batch, levels, a.k, a.seed, following).items():
            for m, v in ms.items():
                per_image.setdefault(name, {}).setdefault(m, []).extend(v)
    summary = summarize(per_image)
    control = "the teacher of the next image" if count > 1 else "the teacher of the image flipped left-right"
    summary.update(images=[n for n, _ in images], ckpt=str(a.ckpt), k=a.k, control=control,
                   teacher_weights=module.teacher.weights_source)
    print(format_table(summary))
    print(f"teacher weights: {module.teacher.weights_source or 'random or unrecorded (see the checkpoint)'}")
    print(f"control (ari_control, nmi_control): each image's student islands against {control}")
    bad = [f"{n}.{m}" for n, v in summary["levels"].items() for m, x in v.items() if not math.isfinite(x)]
    if bad:
        print(f"warning: non-finite values: {', '.join(bad)}")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {a.json}")
    return 0


def interpolate_main(argv: list[str]) -> int:
    """``apm interpolate``: the student's islands along a line between two trigger columns."""
    p = _parser("interpolate", "Interpolate the trigger columns of two images and render the "
                "student's islands and RGB level at each step (the percept is a field): a strip PNG "
                "with a row per level, plus a GIF beside it. One embedding per level is shared by "
                "all steps, so colours are comparable across columns.")
    p.add_argument("--ckpt", required=True, help="checkpoint written by 'apm fit'")
    p.add_argument("--a", required=True, help="first image (file or skimage:NAME)")
    p.add_argument("--b", required=True, help="second image (file or skimage:NAME)")
    p.add_argument("--steps", type=int, default=8, help="interpolation steps, ends included")
    p.add_argument("--out", required=True, help="output PNG; the GIF is written beside it")
    p.add_argument("--display", type=int, default=96, help="pixels per panel")
    p.add_argument("--no-gif", action="store_true", help="skip the GIF")
    _embedding_args(p, method="pca")
    a = p.parse_args(argv)
    if a.steps < 2:
        raise ConfigError(f"Setting '--steps': {a.steps}; an interpolation needs at least 2 (the ends).")
    module = load_trained_module(a.ckpt, pick_device(a.device))
    (_, img_a), = load_images([a.a], module.hparams.image_size, "--a")[:1]
    (_, img_b), = load_images([a.b], module.hparams.image_size, "--b")[:1]
    levels = resolve_levels([l.name for l in module.levels], a.levels)
    for path in interpolation_strip(module, img_a, img_b, a.steps, a.out, levels, a.method,
                                    a.perplexity, a.seed, a.display, gif=not a.no_gif):
        print(path)
    return 0


def perceive_main(argv: list[str]) -> int:
    """``apm perceive``: fit a student to each new image (test-time fitting)."""
    from apm.analysis import config_settings, module_from_config
    from apm.perceive import FitRecipe, perceive_images, save_student
    from apm.runlog import image_seed, resume
    from teachers.base import select_levels

    p = _parser("perceive", "Test-time fitting: per image, a copy of the student is fitted to that "
                "image's teacher features until its mean R^2 over levels reaches --target-r2 or "
                "--max-steps. Per image it writes <out>/<image>.ckpt (the fitted student, weights only: every apm "
                "tool loads it, apm fit --ckpt_path does not), <image>_before.png and <image>_after.png (island figures), and "
                "one line of <out>/perceive.jsonl (steps, seconds, R^2 and ARI per level before and "
                "after). A rerun skips the images already in perceive.jsonl.")
    p.add_argument("--ckpt", help="a trained student (checkpoint of 'apm fit'); its weights are the start")
    p.add_argument("--config", action="append", default=None,
                   help="LightningCLI config(s) giving teacher and student: alone, a fresh student; "
                   "with --ckpt, the settings the checkpoint must match")
    p.add_argument("--images", nargs="+", required=True,
                   help="image files, folders, or skimage:NAME[,NAME...] (embedded photographs)")
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
    a = p.parse_args(argv)
    device = pick_device(a.device)
    if a.ckpt:  # with --config too: the checkpoint must be of that config's teacher and shapes
        module = load_trained_module(a.ckpt, device, **(config_settings(a.config) if a.config else {}))
    elif a.config:
        module = module_from_config(a.config, device)
    else:
        raise ConfigError("apm perceive needs --ckpt (a trained student to start from) or --config "
                          "(a fresh student of that config's teacher, e.g. --config configs/apm.yaml).")
    init = a.init or (None if a.protocol == "official" else "trained" if a.ckpt else "fresh")
    if init == "trained" and not a.ckpt:
        raise ConfigError("Setting '--init trained' needs --ckpt, a trained student to start from; "
                          "with --config the student is fresh (--init fresh).")
    recipe = FitRecipe(protocol=a.protocol, init=init, target_r2=a.target_r2, max_steps=a.max_steps,
                       lr=a.lr, queries_per_image=a.queries, eval_every=a.eval_every, levels=a.levels)
    levels = select_levels([l.name for l in module.levels], a.levels, "--levels")
    images = load_images(a.images, module.hparams.image_size, skip_bad=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "perceive.jsonl"
    settings = {"source": str(Path(a.ckpt).resolve()) if a.ckpt else [str(Path(c).resolve()) for c in a.config],
                "protocol": recipe.protocol, "init": recipe.init, "lr": recipe.learning_rate(),
                "target_r2": a.target_r2, "max_steps": a.max_steps, "queries": a.queries,
                "eval_every": a.eval_every, "levels": a.levels, "k": a.k, "run_seed": a.seed}
    done = resume(log, settings, "apm perceive")
    todo = [(n, img) for n, img in images if n not in done]
    if done:
        print(f"skipping {len(images) - len(todo)} image(s) already in {log} (delete it to redo them)")
    for start in range(0, len(todo), max(1, a.batch_size)):
        part = todo[start : start + max(1, a.batch_size)]
        batch = torch.stack([img for _, img in part])
        with torch.no_grad():
            feats = module.targets(batch.to(device))  # the teacher runs once per image
        seeds = [image_seed(name, a.seed) for name, _ in part]
        fitted = perceive_images(module, batch, seeds, recipe, features=feats)
        for b, ((name, img), (before, after, rec)) in enumerate(zip(part, fitted)):
            mine = [f[b : b + 1] for f in feats]
            ckpt = out / f"{name}.ckpt"
            save_student(after, ckpt, extra=rec)
            line = {"image": name, **rec, **settings, "ckpt": str(ckpt)}
            for when, m in (("before", before), ("after", after)):
                scores = island_scores(m, img[None], levels, k=a.k, seed=a.seed, targets=mine)
                line[f"ari_{when}"] = {lvl: s["ari"][0] for lvl, s in scores.items()}
                if a.figures != "none":
                    line[f"figure_{when}"] = str(island_figures(m, img[None], [f"{name}_{when}"], out, levels,
                                                                method=a.figures, seed=a.seed, k=a.k,
                                                                targets=mine)[0])
            with log.open("a") as f:
                f.write(json.dumps(line) + "\n")
            print(f"{name}: mean R^2 {rec['r2_mean_before']:.3f} -> {rec['r2_mean_after']:.3f} in "
                  f"{rec['steps']} steps, {rec['seconds']:.1f} s ({'reached' if rec['reached'] else 'not reached'}"
                  f" {a.target_r2}) -> {ckpt}")
    print(f"wrote {log}")
    return 0
