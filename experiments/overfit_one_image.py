"""Overfit a fresh APM student to one image's teacher features (the paper's one-sample result).

A real Lightning Trainer fits the student to a single image, every location of every level per
step. At several iteration counts the script saves the island figure (input | teacher | student)
and measures fidelity and island agreement per level (``apm.analysis.island_scores``); at the end it
draws the loss curve and writes every number to a JSON file.

    python -m experiments.overfit_one_image                       # tiny random DINOv2, offline
    python -m experiments.overfit_one_image --image skimage:coffee --steps 50 200 800
    python -m experiments.overfit_one_image --teacher dinov2_small --teacher-args '{"pretrained": true}' \
        --image-size 448 --hidden-dims 1024 1024 1024 1024 --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


from experiments.common import ROOT
from apm.analysis import island_figures, island_scores, summarize
from apm.data import load_images
from apm.module import APMModule


class Repeat(Dataset):
    """One image, ``n`` times: an epoch is ``n`` steps on it."""

    def __init__(self, image: torch.Tensor, n: int):
        self.image, self.n = image, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.image


class Milestones(L.Callback):
    """Records the loss of every step; at the given steps scores the student and draws figures."""

    def __init__(self, image: torch.Tensor, name: str, steps: Sequence[int], out: Path | None,
                 k: int, figures: bool, method: str):
        self.image, self.name, self.steps = image, name, set(steps)
        self.out, self.k, self.figures, self.method = out, k, figures, method
        self.losses: list[float] = []
        self.scores: dict[int, dict[str, Any]] = {}

    def measure(self, module: APMModule, step: int) -> None:
        was_training = module.training
        module.eval()
        img = self.image[None].to(module.device)
        self.scores[step] = summarize(island_scores(module, img, k=self.k))
        if self.figures and self.out is not None:
            island_figures(module, img, [self.name], self.out, method=self.method, k=self.k,
                           prefix=f"islands_step{step:05d}_")
        module.train(was_training)

    def on_train_start(self, trainer, module) -> None:
        self.measure(module, 0)  # the untrained student (statistics already set in on_fit_start)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        if trainer.global_step in self.steps:
            self.measure(module, trainer.global_step)


def overfit(image: torch.Tensor, name: str = "image", steps: Sequence[int] = (50, 200, 600),
            teacher: str = "dinov2_tiny", teacher_args: dict | None = None,
            hidden_dims: Sequence[int] = (256, 256, 256), pe_dim: int = 64, level_dim: int = 16,
            lr: float = 2e-3, k: int = 8, seed: int = 0, out: Path | None = None,
            figures: bool = True, method: str = "tsne", accelerator: str = "cpu",
            save_ckpt: Path | None = None, pe_max_freq: float | None = None) -> dict[str, Any]:
    """Fit a fresh student to ``image`` (3, S, S) for ``max(steps)`` steps with a real Trainer.

    ``save_ckpt`` writes the final student as a checkpoint for ``apm islands`` and ``apm eval``.
    Returns ``{"steps": {n: summary}, "loss": [...], ...}`` where a summary is ``apm.analysis.summarize``
    of the scores at step n (step 0 = the untrained student).
    """
    L.seed_everything(seed, verbose=False)
    args = {"pretrained": False} if teacher_args is None else dict(teacher_args)
    module = APMModule(teacher=teacher, teacher_args=args, image_size=image.shape[-1],
                       hidden_dims=list(hidden_dims), pe_dim=pe_dim, level_dim=level_dim,
                       pe_max_freq=pe_max_freq, queries_per_image=0, lr=lr, warmup_steps=10,
                       min_lr_ratio=0.1, stats_images=1)
    module.fit_statistics([image[None]])  # the level statistics of this one image
    track = Milestones(image, name, steps, out, k, figures, method)
    trainer = L.Trainer(max_steps=max(steps), accelerator=accelerator, devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[track],
                        default_root_dir=str(out) if out else None, precision="32-true")
    start = time.perf_counter()
    trainer.fit(module, DataLoader(Repeat(image, max(steps)), batch_size=1))
    if save_ckpt is not None:  # loads like any 'apm fit' checkpoint: apm islands/eval --ckpt
        trainer.save_checkpoint(save_ckpt)
    return {"image": name, "teacher": teacher, "teacher_args": args, "image_size": image.shape[-1],
            "levels": [l.name for l in module.levels], "hidden_dims": list(hidden_dims), "lr": lr,
            "pe_max_freq": module.student.pe_max_freq,
            "k": k, "seconds": time.perf_counter() - start,
            "steps": {int(s): v for s, v in sorted(track.scores.items())},
            "loss": [float(f"{x:.6g}") for x in track.losses]}


def loss_curve(losses: Sequence[float], steps: Sequence[int], path: Path) -> None:
    """The training loss (standardized MSE, log scale) with the measured steps marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.semilogy(np.arange(1, len(losses) + 1), losses, lw=1)
    for s in steps:
        ax.axvline(s, color="0.7", lw=0.8, ls="--")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (standardized MSE)")
    ax.set_title("overfitting one image")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--image", default="skimage:astronaut", help="image file or skimage:NAME")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, nargs="+", default=[50, 200, 600],
                   help="iteration counts at which to measure and draw (the last is the run's length)")
    p.add_argument("--teacher", default="dinov2_tiny", help="registered teacher name")
    p.add_argument("--teacher-args", type=json.loads, default=None,
                   help='JSON of the teacher\'s arguments; default {"pretrained": false}')
    p.add_argument("--hidden-dims", type=int, nargs="+", default=[256, 256, 256])
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--k", type=int, default=8, help="k-means clusters for ARI / NMI")
    p.add_argument("--method", choices=("tsne", "pca"), default="tsne", help="island colouring")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "overfit_one_image",
                   help="folder for the figures")
    p.add_argument("--save-ckpt", type=Path, default=None,
                   help="write the final student here (default <out>/student.ckpt)")
    p.add_argument("--json", type=Path, default=ROOT / "experiments" / "results" / "overfit_one_image.json")
    a = p.parse_args(argv)
    (name, image), = load_images([a.image], a.image_size, "--image")[:1]
    res = overfit(image, name, sorted(set(a.steps)), a.teacher, a.teacher_args, a.hidden_dims,
                  lr=a.lr, k=a.k, seed=a.seed, out=a.out, method=a.method,
                  accelerator="gpu" if a.device.startswith("cuda") else "cpu",
                  save_ckpt=a.save_ckpt or a.out / "student.ckpt")
    loss_curve(res["loss"], sorted(set(a.steps)), a.out / "loss.png")
    res.update(figures=sorted(str(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p)
                              for p in a.out.glob("*.png")))
    from experiments.common import write_results

    write_results(a.json, res)
    for step, summ in res["steps"].items():
        per = " ".join(f"{n}={v['ari']:.2f}" for n, v in summ["levels"].items())
        loss = f"{res['loss'][step - 1]:.4f}" if step else "   -  "
        print(f"step {step:>5}: loss {loss}  "
              f"R2 {summ['mean']['r2']:.3f}  ARI mean {summ['mean']['ari']:.3f} ({per})")
    print(f"figures under {a.out} ({res['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
