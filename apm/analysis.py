"""The analysis library behind ``apm islands``, ``apm eval``, ``apm interpolate`` and the
``IslandFigures`` callback: pure functions on modules, features and images (no argument parsing).

Inputs (``load_images``, ``load_trained_module``, ``teacher_from_config``), features and figures
(``level_features``, ``island_figures``, ``teacher_figures``), scores (``island_scores``,
``summarize``, ``format_table``) and the trigger-column interpolation (``interpolate_features``,
``interpolation_strip``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from einops import rearrange

from apm import islands
from apm.errors import ConfigError
from teachers.base import level_indices


# -- inputs ----------------------------------------------------------------------------------------
def load_images(specs: Sequence[str], image_size: int, setting: str = "--images",
                skip_bad: bool = False) -> list[tuple[str, torch.Tensor]]:
    """(name, image (3, S, S) in [0, 1]) for image files, folders (searched recursively) and
    ``skimage:NAME[,NAME...]`` (photographs embedded in scikit-image). A missing path or an
    unreadable file is an error, or with ``skip_bad`` a warning naming it (and a count at the
    end); ConfigError when no image is left."""
    from apm.data import find_images, image_transform, load_image, skimage_names, skimage_photo
    from apm.errors import UnreadableImageError

    tf = image_transform(image_size)
    out: list[tuple[str, torch.Tensor]] = []
    skipped: list[str] = []

    def bad(message: str) -> None:
        if not skip_bad:
            raise ConfigError(message)
        warnings.warn(f"skipped: {message}", stacklevel=3)
        skipped.append(message)

    for spec in specs:
        if spec.startswith("skimage:"):
            out += [(name, tf(skimage_photo(name))) for name in skimage_names(spec, setting)]
            continue
        path = Path(spec)
        if not path.exists():
            bad(f"Setting {setting!r}: {spec!r} does not exist. Give image files, folders of images, "
                f"or skimage:NAME for an embedded photograph.")
            continue
        files = find_images(path)
        if not files:
            bad(f"Setting {setting!r}: no image files under {spec!r}.")
        for f in files:
            try:
                out.append((f.stem, tf(load_image(f, image_size))))
            except UnreadableImageError as e:
                bad(f"Setting {setting!r}: {e}")
    if skipped:
        warnings.warn(f"{len(skipped)} of the inputs in {setting!r} were skipped (named above); "
                      f"{len(out)} image(s) loaded.", stacklevel=2)
    if not out:
        raise ConfigError(f"Setting {setting!r}: no readable image among {list(specs)}.")
    names: dict[str, int] = {}
    unique = []
    for name, img in out:  # two files with one stem must not overwrite each other's figure
        names[name] = names.get(name, 0) + 1
        unique.append((name if names[name] == 1 else f"{name}-{names[name]}", img))
    return unique


def pick_device(device: str) -> torch.device:
    """``auto`` = CUDA when available, else CPU; ConfigError for CUDA without a GPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("Setting '--device': CUDA is not available on this machine; use --device cpu.")
    return torch.device(device)


def load_trained_module(path: str, device: torch.device, **overrides: Any):
    """An APMModule in eval mode from a checkpoint of ``apm fit`` (safe load, shape checked;
    ``overrides`` replace saved settings, and one that changes the teacher or a shape is refused
    with a ConfigError naming '--ckpt'); ConfigError when no training step ran (the level
    statistics are not set)."""
    from apm.module import APMModule

    module = APMModule.from_checkpoint(path, map_location=device, setting="--ckpt", **{
        **overrides, "compile": False, "feature_cache": None})
    if not bool(module.standardizer.ready):
        raise ConfigError(f"Setting '--ckpt': {path} was saved before the level statistics were "
                          f"computed (no training step ran); use a checkpoint of a trained run.")
    return module


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_configs(paths: Sequence[str]) -> tuple[dict, dict, int]:
    """The model and data sections of LightningCLI config files (later files override earlier
    ones, as with ``apm fit -c a.yaml -c b.yaml``) and the image size they set."""
    import yaml

    cfg: dict = {}
    for p in paths:
        if not Path(p).is_file():
            raise ConfigError(f"Setting '--config': {p!r} is not a file; give a config such as configs/apm.yaml.")
        cfg = _deep_merge(cfg, yaml.safe_load(Path(p).read_text()) or {})
    model, data = cfg.get("model") or {}, cfg.get("data") or {}
    return model, data, int(data.get("image_size") or model.get("image_size") or 448)


def config_settings(paths: Sequence[str]) -> dict[str, Any]:
    """The model settings of LightningCLI config files, with the data section's image size."""
    model, _, image_size = _read_configs(paths)
    settings = {k: v for k, v in model.items() if k not in ("class_path", "init_args")}
    settings.update(model.get("init_args") or {})
    return {**settings, "image_size": image_size}


def module_from_config(paths: Sequence[str], device: torch.device, **overrides: Any):
    """A fresh, untrained APMModule (no level statistics) with the model settings of LightningCLI
    config files; ``overrides`` replace settings."""
    from apm.module import APMModule

    settings = config_settings(paths)
    try:
        module = APMModule(**{**settings, "compile": False, "feature_cache": None, **overrides})
    except TypeError as e:
        raise ConfigError(f"Setting '--config': the model section of {', '.join(paths)} does not fit "
                          f"APMModule ({e}); see 'apm fit --help' for the model settings.") from None
    return module.to(device).eval()


def teacher_from_config(paths: Sequence[str], device: torch.device):
    """The teacher (``model.teacher``, or the set of ``model.teachers``) and image size named by
    LightningCLI config files (later files override earlier ones, as with ``apm fit -c a.yaml -c
    b.yaml``)."""
    from teachers.multi import build_teacher

    model, _, image_size = _read_configs(paths)
    teacher = build_teacher(model.get("teacher"), model.get("teacher_args"), model.get("teachers"),
                            image_size)
    teacher.set_precision(str(model.get("teacher_precision", "32")))
    return teacher.to(device), image_size


def resolve_levels(names: list[str], wanted: Sequence[str] | None) -> list[int]:
    """Indices of the wanted levels (names or integer indices); all when None."""
    from teachers.base import select_levels

    return select_levels(names, list(wanted) if wanted else None, "--levels")


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
    levels = level_indices(module.levels, levels)
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
    levels = level_indices(lv, levels)
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


METRICS = ("cos", "cos_centered", "r2", "mse", "ari", "nmi", "ari_control", "nmi_control")


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
    levels = level_indices(module.levels, levels)
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
    col = st.column_term((1 - alpha) * ta + alpha * tb)  # (steps, H1)
    out = []
    for lvl in levels:
        h, w = module.levels[lvl].grid
        pred = module.standardizer.decode(lvl, st.answer(col, lvl, st.position_term(st.coords(lvl))).float())
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

    levels = level_indices(module.levels, levels)
    feats = interpolate_features(module, image_a, image_b, steps, levels)
    maps = []
    for i, f in zip(levels, feats):
        if module.levels[i].name == islands.RGB_LEVEL and f.shape[-1] == 3:
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
    written = [out]
    if gif:
        from PIL import Image

        gap = np.ones((display, 4, 3))
        frames = []
        for s in range(steps):
            tiles = [ends[0], gap]
            for m in maps:
                tiles += [islands.upsample_nearest(m[s], display), gap]
            tiles.append(ends[1])
            frames.append(Image.fromarray((np.concatenate(tiles, axis=1) * 255).round().astype(np.uint8)))
        path = out.with_suffix(".gif")
        frames = frames + frames[-2:0:-1]  # there and back
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=250, loop=0)
        written.append(path)
    return written
