"""Does the positional code's top frequency matter? Two students fitted to one photograph, one
with the grid-tied default (half the grid side, its Nyquist limit) and one with the old fixed 64
cycles per side, compared on the grid they were trained on and between its cell centres.

    python -m experiments.pe_frequency      # about 5 minutes on 2 CPU cores

On the grid: mean R^2 against the teacher. Between the centres: the student is queried on a grid
4x finer, and its answers are compared with the bilinear interpolation of its own on-grid answers
(relative RMS over the spread of the on-grid answers). Teacher features exist only at the centres,
so nothing trains the field between them; a field that stays close to the interpolation of its
grid values there is one whose in-between answers are predictable. Writes
experiments/results/pe_frequency.json.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange


from experiments.common import ROOT
from experiments.common import write_results
from experiments.overfit_one_image import overfit

from apm.data import load_images
from apm.codes import grid_coords
from apm.module import APMModule


@torch.no_grad()
def between_centres(module: APMModule, image: torch.Tensor, level: int, factor: int = 4) -> float:
    """Relative RMS between the student's answers on a grid ``factor`` times finer and the
    bilinear interpolation of its answers at the cell centres."""
    st = module.student
    h, w = module.levels[level].grid
    coarse = st.query(image[None], level, st.coords(level))  # (1, h*w, d)
    fine_coords = grid_coords((h * factor, w * factor))
    fine = st.query(image[None], level, fine_coords)
    grid = rearrange(coarse, "1 (h w) d -> 1 d h w", h=h)
    # bilinear over cell centres (align_corners=False puts samples at the same centres)
    interp = F.interpolate(grid, scale_factor=factor, mode="bilinear", align_corners=False)
    interp = rearrange(interp, "1 d h w -> 1 (h w) d")
    spread = coarse.std(dim=1).pow(2).mean().sqrt()
    return float((fine - interp).pow(2).mean().sqrt() / spread)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", default="skimage:astronaut")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--json", type=Path, default=ROOT / "experiments" / "results" / "pe_frequency.json")
    a = p.parse_args(argv)
    (name, image), = load_images([a.image], a.image_size, "--image")[:1]
    res = {"image": name, "image_size": a.image_size, "steps": a.steps, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for label, freq in (("grid_nyquist", None), ("fixed_64", 64.0)):
            ckpt = Path(tmp) / f"{label}.ckpt"
            run = overfit(image, name, [a.steps], figures=False, save_ckpt=ckpt, pe_max_freq=freq)
            module = APMModule.from_checkpoint(ckpt)
            summary = run["steps"][a.steps]
            levels = [i for i, l in enumerate(module.levels) if l.name != "rgb"]
            res["runs"][label] = {
                "pe_max_freq": module.student.pe_max_freq,
                "r2_on_grid": summary["mean"]["r2"], "ari_on_grid": summary["mean"]["ari"],
                "between_centres_rel_rms": {module.levels[i].name: between_centres(module, image, i)
                                            for i in levels},
            }
            r = res["runs"][label]
            print(f"{label:13s} max freq {r['pe_max_freq']:5.1f}: R^2 on the grid {r['r2_on_grid']:.3f}, "
                  f"ARI {r['ari_on_grid']:.3f}; between centres (rel. RMS off bilinear) "
                  + ", ".join(f"{k} {v:.2f}" for k, v in r["between_centres_rel_rms"].items()), flush=True)
    write_results(a.json, res)
    return res


if __name__ == "__main__":
    main()
