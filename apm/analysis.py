"""The analysis library behind ``apm islands``, ``apm eval``, ``apm interpolate`` and the
``IslandFigures`` callback: pure functions on modules, features and images (no argument parsing).

Its inputs come from ``apm.data.read_images`` and ``APMModule.from_checkpoint``. Features and figures (``level_features``, ``island_figures``, ``teacher_figures``), scores (``island_scores``,
``summarize``, ``format_table``) and the trigger-column interpolation (``interpolate_features``,
``interpolation_strip``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from einops import rearrange

from apm import islands
from apm.offgrid import PREDICTORS
from apm.students.base import RGB
from teachers.base import select_levels


# -- features, figures, scores ---------------------------------------------------------------------
@torch.no_grad()
def level_features(module, images: torch.Tensor, levels: Sequence[int],
                   targets: Sequence[torch.Tensor] | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Teacher and student features (B, h, w, d), on the teacher's scale, of the chosen levels;
    ``targets``: the teacher's features of every level (``module.targets(images)``) when already
    computed, so that the teacher does not run again."""
    images = images.to(module.device)
    targets = module.targets(images) if targets is None else [t.to(module.device) for t in targets]
    return [targets[i] for i in levels], module.predict_features(images, levels)


def island_figures(module, images: torch.Tensor, names: Sequence[str], out_dir: str | Path,
                   levels: Sequence[int] | None = None, method: str = "tsne", perplexity: float = 30.0,
                   seed: int = 0, k: int = 8, max_iter: int = 1000, display: int = 192,
                   prefix: str = "", targets: Sequence[torch.Tensor] | None = None) -> list[Path]:
    """One island figure per image (input | teacher | student, a row per level) from an APMModule;
    each row is labelled with its grid and the ARI of k-means islands. Returns the PNG paths.
    ``targets``: as in ``level_features``."""
    levels = select_levels(module.levels, levels)
    teacher, student = level_features(module, images, levels, targets)
    lnames = [module.levels[i].name for i in levels]
    paths = []
    for b, name in enumerate(names):
        t, s = [f[b] for f in teacher], [f[b] for f in student]
        rows = islands.level_rows(lnames, t, s, method, perplexity, seed, max_iter, module.device)
        for row, tf, sf in zip(rows, t, s):
            row.note = f"ARI {islands.island_agreement(tf, sf, k, seed)['ari']:.2f}"
        path = Path(out_dir) / f"{prefix}{name}.png"
        islands.island_figure(images[b], rows, path, display, title=name)
        paths.append(path)
    return paths


def teacher_figures(teacher, images: torch.Tensor, names: Sequence[str], out_dir: str | Path,
                    levels: Sequence[int] | None = None, method: str = "tsne", perplexity: float = 30.0,
                    seed: int = 0, max_iter: int = 1000, display: int = 192) -> list[Path]:
    """Island figures of a teacher alone (input | teacher islands)."""
    lv = teacher.levels
    levels = select_levels(lv, levels)
    with torch.no_grad():
        feats = teacher(images.to(next(teacher.parameters()).device))
    paths = []
    for b, name in enumerate(names):
        rows = islands.level_rows([lv[i].name for i in levels], [feats[i][b] for i in levels],
                                  None, method, perplexity, seed, max_iter, feats[0].device)
        path = Path(out_dir) / f"{name}.png"
        islands.island_figure(images[b], rows, path, display, title=f"{name} (teacher only)")
        paths.append(path)
    return paths


METRICS = ("cos", "cos_centered", "r2", "mse", "ari", "nmi", "ari_control", "nmi_control",
           *(f"r2_offgrid_{p}" for p in PREDICTORS))


def control_teacher(teacher: torch.Tensor, following: torch.Tensor | None = None) -> torch.Tensor:
    """The teacher features (B, h, w, d) each image's student is compared with for the chance
    baseline: those of the next image of the batch, the last image's being ``following`` (h, w, d)
    or, without it, the batch's first; a single image without ``following`` gets its own features
    flipped left-right."""
    if following is not None:
        return torch.cat([teacher[1:], following[None].to(teacher)])
    return teacher.roll(-1, 0) if len(teacher) > 1 else teacher.flip(2)


@torch.no_grad()
def island_scores(module, images: torch.Tensor, levels: Sequence[int] | None = None, k: int = 8,
                  seed: int = 0, next_image: torch.Tensor | None = None,
                  targets: Sequence[torch.Tensor] | None = None) -> dict[str, dict[str, list[float]]]:
    """Per level and metric, one value per image: the fidelity measures of ``APMModule.evaluate``
    (cos, cos_centered, r2, mse), the island agreement of k-means label maps (ari, nmi), and the
    same agreement with another image's teacher islands (ari_control, nmi_control: what chance
    scores; see ``control_teacher``, whose ``following`` is the teacher's features of
    ``next_image`` (3, S, S) when given). ``targets``: as in ``level_features``."""
    levels = select_levels(module.levels, levels)
    images = images.to(module.device)
    teacher, student = level_features(module, images, levels, targets)  # one teacher pass for the batch
    following: list[torch.Tensor | None] = [None] * len(levels)
    if next_image is not None:
        targets = module.targets(next_image[None].to(module.device))
        following = [targets[i][0] for i in levels]
    fidelity = module.fidelity(teacher, student, levels)
    out: dict[str, dict[str, list[float]]] = {}
    for i, t, s, f in zip(levels, teacher, student, following):
        name = module.levels[i].name
        scores = {m: v.float().cpu().tolist() for m, v in fidelity[name].items()}
        control = control_teacher(t, f)
        agree = [islands.island_agreement(t[b], s[b], k, seed) for b in range(len(images))]
        chance = [islands.island_agreement(control[b], s[b], k, seed) for b in range(len(images))]
        scores.update({m: [a[m] for a in agree] for m in ("ari", "nmi")})
        scores.update({f"{m}_control": [a[m] for a in chance] for m in ("ari", "nmi")})
        out[name] = scores
    return out


def summarize(per_image: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """``{"levels": {name: {metric: mean over images}}, "mean": {metric: mean over levels}}``."""
    levels = {n: {m: float(np.mean(v)) for m, v in ms.items()} for n, ms in per_image.items()}
    metrics = [m for m in METRICS if all(m in v for v in levels.values())]
    mean = {m: float(np.mean([v[m] for v in levels.values()])) for m in metrics}
    return {"levels": levels, "mean": mean}


def format_table(summary: dict[str, Any]) -> str:
    """The summary as a fixed-width text table, a row per level and a mean row."""
    metrics = list(summary["mean"])
    width = max(6, *(len(n) for n in summary["levels"]))
    lines = [f"{'level':<{width}} " + " ".join(f"{m:>12}" for m in metrics)]
    for name, v in [*summary["levels"].items(), ("mean", summary["mean"])]:
        lines.append(f"{name:<{width}} " + " ".join(f"{v[m]:>12.4f}" for m in metrics))
    return "\n".join(lines)


@torch.no_grad()
def interpolate_features(module, image_a: torch.Tensor, image_b: torch.Tensor, steps: int,
                         levels: Sequence[int]) -> list[torch.Tensor]:
    """The student's dense features (steps, h, w, d), teacher's scale, per level, along the line
    between the trigger columns of two images (3, S, S): T = (1 - a) T_A + a T_B, a in [0, 1]."""
    st = module.student
    pair = torch.stack([image_a, image_b]).to(module.device)
    ta, tb = st.trigger(pair)
    alpha = torch.linspace(0, 1, steps, device=module.device)[:, None]
    mixed = (1 - alpha) * ta + alpha * tb
    out = []
    for lvl in levels:
        h, w = module.levels[lvl].grid
        pred = module.query_features(lvl, st.coords(lvl), trigger=mixed)
        out.append(rearrange(pred, "s (h w) d -> s h w d", h=h, w=w))
    return out


def interpolation_strip(module, image_a: torch.Tensor, image_b: torch.Tensor, steps: int,
                        out: str | Path, levels: Sequence[int] | None = None, method: str = "pca",
                        perplexity: float = 30.0, seed: int = 0, display: int = 96,
                        gif: bool = True) -> list[Path]:
    """A strip PNG (a row per level; columns A, the steps, B) and optionally a GIF (one frame per
    step, levels side by side). One embedding per level is shared by all steps, so a colour means
    the same feature in every column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = select_levels(module.levels, levels)
    feats = interpolate_features(module, image_a, image_b, steps, levels)
    maps = []
    for i, f in zip(levels, feats):
        if module.levels[i].name == RGB and f.shape[-1] == 3:
            maps.append(np.clip(f.cpu().numpy(), 0, 1))
        else:
            maps.append(islands.embed_rgb([f], method, perplexity, seed, device=module.device)[0])
    alphas = np.linspace(0, 1, steps)
    ends = [islands.upsample_image(islands.image_to_array(x), display) for x in (image_a, image_b)]
    ncol = steps + 2
    cell = display / 100 + 0.08
    fig, axes = plt.subplots(len(levels), ncol, squeeze=False, dpi=100,
                             figsize=(ncol * cell + 0.8, len(levels) * cell + 0.5))
    fig.subplots_adjust(left=0.8 / fig.get_figwidth(), right=0.99, bottom=0.02,
                        top=1 - 0.4 / fig.get_figheight(), wspace=0.04, hspace=0.06)
    for r, (i, m) in enumerate(zip(levels, maps)):
        panels = [ends[0]] + [islands.upsample_nearest(m[s], display) for s in range(steps)] + [ends[1]]
        titles = ["A"] + [f"{a:.2f}" for a in alphas] + ["B"]
        for c, p in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(p, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=8)
        h, w = module.levels[i].grid
        axes[r, 0].set_ylabel(f"{module.levels[i].name}\n{h}x{w}", fontsize=8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return [out, _interpolation_gif(out.with_suffix(".gif"), maps, ends, steps, display)] if gif else [out]


def _interpolation_gif(path: Path, maps: list[np.ndarray], ends: list[np.ndarray], steps: int,
                       display: int) -> Path:
    """One frame per step (A, the levels, B side by side), there and back."""
    from PIL import Image

    gap = np.ones((display, 4, 3))
    frames = []
    for s in range(steps):
        tiles = [ends[0], gap]
        for m in maps:
            tiles += [islands.upsample_nearest(m[s], display), gap]
        tiles.append(ends[1])
        frames.append(Image.fromarray((np.concatenate(tiles, axis=1) * 255).round().astype(np.uint8)))
    frames = frames + frames[-2:0:-1]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=250, loop=0)
    return path
