"""Zero-shot classification after test-time fitting: the APM paper's evaluation, scored.

For each image of a labelled folder (one subfolder per class), the CLIP teacher's zero-shot
prediction comes from its ``global`` level (exactly ``model.encode_image``) against the text
embeddings of the class prompts. Then a student is fitted to that image's teacher features with
``apm.perceive.fit_images`` (the paper's protocol: a fresh student per image; or our warm start from
a distilled student), and at each requested step count the student answers the ``global`` level
(one query at the image centre of its 1x1 grid, decoded with the statistics it is fitted with), and
that answer goes through the same zero-shot head. One fit per image records every step count.

``apm classify`` (``apm/commands/classify.py``) writes one JSON line per image as it goes and a summary table:
accuracy of the teacher and of the student at each step count, their agreement, the student's R^2
on ``global``, and seconds per image.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from apm.errors import ConfigError, UnreadableImageError
from apm.runlog import image_seed, read_log, settings_conflict
from apm.skipping import SkipLog, failure_reason

GLOBAL = "global"
LOG_NAME, SUMMARY_NAME = "classify.jsonl", "summary.json"
IMAGENET_CLASSES = "imagenet"  # --classes imagenet: wnid or index folders -> CLIP's ImageNet names


# -- inputs ----------------------------------------------------------------------------------------
@dataclass
class LabelledFolder:
    """A classification set: ``folders[c]`` is class ``c``'s subfolder, ``names[c]`` the name its
    prompts use, ``items`` every image file with its class index, sorted by class then path."""

    root: Path
    folders: list[str]
    names: list[str]
    items: list[tuple[Path, int]]

    def image_id(self, path: Path) -> str:
        """An image's key in the JSON lines: its path relative to the root, with '/'."""
        return path.relative_to(self.root).as_posix()

    def seed(self, path: Path, seed: int = 0) -> int:
        """The image's seed (``apm.runlog.image_seed`` of its key): it does not change when other
        files are added or removed (a rerun redoes an image exactly)."""
        return image_seed(self.image_id(path), seed)


def _imagenet_names() -> dict[str, str]:
    """CLIP's curated ImageNet class names (open_clip's, in class-index order) by wnid and by index:
    the folder names of ImageNet, -A, -R and -Sketch (wnids) and of ImageNet-V2 (0..999)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    out = {}
    for i, name in enumerate(IMAGENET_CLASSNAMES):
        out[info.index_to_label_name(i)] = name
        out[str(i)] = name
    return out


def read_class_names(spec: str, problems: list[str]) -> dict[str, str]:
    """Folder -> class name from ``--classes``: ``imagenet`` (built in), a JSON object, or a text
    file with lines ``FOLDER NAME`` (split at the first whitespace; blank and ``#`` lines
    skipped). Problems are appended to ``problems``."""
    if spec == IMAGENET_CLASSES:
        return _imagenet_names()
    path = Path(spec)
    if not path.is_file():
        problems.append(f"'--classes' {spec!r} is not a file (give a JSON object folder -> name, a "
                        f"text file of 'FOLDER NAME' lines, or 'imagenet')")
        return {}
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            problems.append(f"'--classes' {spec} is not valid JSON ({e})")
            return {}
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            problems.append(f"'--classes' {spec} must be a JSON object of folder name -> class name")
            return {}
        return {str(k): v for k, v in data.items()}
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 1)
        if len(parts) < 2:
            problems.append(f"line {n} of '--classes' {spec} ({line!r}) has no class name after the "
                            f"folder name")
            continue
        out[parts[0]] = parts[1].strip()
    return out


def scan_folder(root: str | Path, class_names: dict[str, str] | None, problems: list[str]
                ) -> LabelledFolder:
    """The classes (subfolders, sorted) and image files (searched recursively per class) of
    ``root``; a missing root, no class folders, a class folder without images and a folder the
    ``class_names`` mapping lacks are appended to ``problems``."""
    from apm.data import find_images

    root = Path(root)
    if not root.is_dir():
        problems.append(f"'--data' {str(root)!r} is not a folder (give a folder with one subfolder "
                        f"of images per class)")
        return LabelledFolder(root, [], [], [])
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        problems.append(f"'--data' {root} has no class folders (it must hold one subfolder of images "
                        f"per class, named after the class)")
    items, empty = [], []
    for c, folder in enumerate(folders):
        files = find_images(root / folder)
        if not files:
            empty.append(folder)
        items += [(f, c) for f in files]
    if empty:
        problems.append(f"class folder(s) {_listing(empty)} under {root} have no image files")
    names = list(folders)
    if class_names is not None and folders:
        missing = [f for f in folders if f not in class_names]
        if missing:
            problems.append(f"'--classes' names no class for folder(s) {_listing(missing)}")
        names = [class_names.get(f, f) for f in folders]
    return LabelledFolder(root, folders, names, items)


def read_templates(path: str | Path, problems: list[str]) -> list[str]:
    """Prompt templates from a file, one a line, each with one ``{}`` for the class name (blank
    lines skipped); a line without ``{}`` (or that does not format) is appended to ``problems``."""
    path = Path(path)
    if not path.is_file():
        problems.append(f"'--templates' {str(path)!r} is not a file (one prompt template a line, "
                        f"like 'a photo of a {{}}.')")
        return []
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        t = line.strip()
        if not t:
            continue
        try:
            ok = "{}" in t and t.format("x") is not None
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            problems.append(f"line {n} of '--templates' {path} ({t!r}) has no '{{}}' for the class "
                            f"name (write it like 'a photo of a {{}}.')")
            continue
        out.append(t)
    if not out and not any(str(path) in p for p in problems):
        problems.append(f"'--templates' {path} has no templates")
    return out


def _listing(names: Sequence[str], most: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def classification_inputs(data: str | Path, classes: str | None = None,
                          templates: str | Path | None = None, steps: Sequence[int] = (0,),
                          log: Path | None = None, settings: dict[str, Any] | None = None,
                          ) -> tuple[LabelledFolder, list[str] | None]:
    """Check every input before any work and raise one ConfigError naming all problems: the
    labelled folder (and ``--classes``), the templates file (None = CLIP's 80), the step counts,
    and, when ``log`` exists, that its lines were written with the same ``settings``."""
    problems: list[str] = []
    names = read_class_names(classes, problems) if classes else None
    folder = scan_folder(data, names, problems)
    tpl = read_templates(templates, problems) if templates else None
    bad = [s for s in steps if s < 0]
    if bad or not steps:
        problems.append(f"'--steps' {list(steps)}: give one or more step counts >= 0 (e.g. 0 10 50)")
    if log is not None and settings is not None:
        try:
            problem = settings_conflict(read_log(log, "apm classify", warn=False), settings, log)
        except ConfigError as e:
            problem = str(e)
        if problem:
            problems.append(problem)
    if problems:
        raise ConfigError("apm classify cannot start: " + "; ".join(problems) + ".")
    return folder, tpl


# -- the work --------------------------------------------------------------------------------------
def global_level(module) -> int:
    """The index of the ``global`` level among ``module``'s levels; ConfigError naming the fix
    when the teacher is not a CLIP with that level."""
    names = [l.name for l in module.levels]
    if not hasattr(module.teacher, "encode_text") or GLOBAL not in names:
        teacher = module.hparams.get("teacher")
        raise ConfigError(
            f"apm classify needs a CLIP teacher whose levels include {GLOBAL!r} (the image "
            f"embedding the zero-shot head reads): this student's teacher is {teacher!r} with levels "
            f"{', '.join(names)}. Use a CLIP teacher (clip_vit_b16, clip_vit_l14, clip_vit_h14, clip, "
            f"clip_tiny; configs/clip.yaml) and keep {GLOBAL!r} in 'model.teacher_args.levels'.")
    return names.index(GLOBAL)


def global_among_fitted(module, levels: Sequence[int | str] | None) -> tuple[list[int], int]:
    """The levels fitted (``select_levels`` of ``levels``) and the position of ``global`` among
    them; ConfigError when ``global`` is left out."""
    from teachers.base import select_levels

    g = global_level(module)
    names = [l.name for l in module.levels]
    fitted = select_levels(names, levels, "--levels")
    if g not in fitted:
        raise ConfigError(f"Setting '--levels': {[names[i] for i in fitted]} leaves out {GLOBAL!r}, "
                          f"the level the student's zero-shot answer is read from; add it.")
    return fitted, fitted.index(g)


def classification_recipe(recipe, steps: Sequence[int], levels: Sequence[int | str] | None):
    """``recipe`` set to run every image to the largest step count (no early stop) with R^2
    checks exactly at ``steps``, fitting ``levels``."""
    last = max(steps)
    return replace(recipe, target_r2=math.inf, max_steps=last, eval_every=max(1, last),
                   eval_at=tuple(sorted(set(steps))), levels=list(levels) if levels else None)


def classify_batch(module, images: torch.Tensor, classifier: torch.Tensor, recipe,
                   steps: Sequence[int], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """Per image of ``images`` (N, 3, S, S): the teacher's zero-shot prediction, then one test-time
    fit (``recipe``, which must fit ``global``; see ``classification_recipe``) recording the
    student's prediction, its R^2 per fitted level and the seconds since the image's start at each
    of ``steps``. Returns one dict per image: ``teacher`` (class index), ``student``, ``r2`` (level
    -> step -> R^2) and ``seconds`` keyed by the step count as a string, ``seconds_teacher``."""
    from apm.perceive import fit_images
    from teachers.clip import zero_shot_logits

    g = global_level(module)
    names = [l.name for l in module.levels]
    fitted, k = global_among_fitted(module, recipe.levels)
    n, want = len(images), {int(s) for s in steps}
    images = images.to(module.device)
    start = time.perf_counter()
    with torch.no_grad():
        feats = module.targets(images)
        teacher = zero_shot_logits(feats[g][:, 0, 0], classifier).argmax(-1).tolist()
    if module.device.type == "cuda":
        torch.cuda.synchronize(module.device)
    seconds_teacher = (time.perf_counter() - start) / n
    out = [{"teacher": t, "student": {}, "r2": {names[i]: {} for i in fitted}, "seconds": {},
            "seconds_teacher": round(seconds_teacher, 5)} for t in teacher]

    def on_eval(step: int, indices: list[int], r2: torch.Tensor, preds: list[torch.Tensor]) -> None:
        if step not in want:
            return
        pred = zero_shot_logits(preds[k][:, 0, 0], classifier).argmax(-1).tolist()
        now = (time.perf_counter() - start) / n  # a batch's images share its time
        for j, i in enumerate(indices):
            out[i]["student"][str(step)] = pred[j]
            for lvl, value in zip(fitted, r2[j].tolist()):
                out[i]["r2"][names[lvl]][str(step)] = round(value, 6)
            out[i]["seconds"][str(step)] = round(now, 5)

    fit_images(module, images, list(seeds), recipe, progress=False, features=feats, on_eval=on_eval)
    return out


def classify_folder(module, folder: LabelledFolder, classifier: torch.Tensor, recipe,
                    steps: Sequence[int], log: Path, settings: dict[str, Any], seed: int = 0,
                    batch_size: int = 1, progress: bool = True) -> tuple[list[dict[str, Any]], list[str]]:
    """Classify every image of ``folder`` not yet in ``log``, appending one JSON line per image
    (with ``settings``) as it goes; each image is seeded by ``LabelledFolder.seed``. Unreadable
    images are named in a warning and skipped. Returns the lines of the folder's images (earlier
    runs' included, in folder order) and the skipped images' messages."""
    from tqdm.auto import tqdm

    from apm.data import read_image

    size = int(module.hparams.image_size)
    done = {line["image"]: line for line in read_log(log, "apm classify")}
    todo = [(folder.seed(p, seed), p, c) for p, c in folder.items if folder.image_id(p) not in done]
    if done and len(todo) < len(folder.items):
        print(f"skipping {len(folder.items) - len(todo)} image(s) already in {log} (delete it to redo them)")
    skipped: list[str] = []
    skip_log = SkipLog()
    bar = tqdm(total=len(todo), desc="classify", unit="image", disable=not progress)
    pending: list[tuple[int, Path, int, torch.Tensor]] = []

    def flush() -> None:
        batch = torch.stack([img for *_, img in pending])
        records = classify_batch(module, batch, classifier, recipe, steps, [s for s, *_ in pending])
        with log.open("a", encoding="utf-8") as f:
            for (s, path, c, _), rec in zip(pending, records):
                line = {"image": folder.image_id(path), "label": c, "class": folder.names[c],
                        **rec, "seed": s, **settings}
                done[line["image"]] = line
                f.write(json.dumps(line) + "\n")
        bar.update(len(pending))
        pending.clear()

    for s, path, c in todo:
        try:
            img = read_image(path, size)
        except UnreadableImageError as e:
            skip_log.record([(str(path), failure_reason(e, str(path)))])  # the one policy: named once
            skipped.append(str(e))
            bar.update(1)
            continue
        pending.append((s, path, c, img))
        if len(pending) >= max(1, batch_size):
            flush()
    if pending:
        flush()
    bar.close()
    skip_log.summary(f"; {len(todo) - len(skipped)} image(s) classified")
    lines = [done[k] for k in (folder.image_id(p) for p, _ in folder.items) if k in done]
    return lines, skipped


# -- the table -------------------------------------------------------------------------------------
def summarize(lines: Sequence[dict[str, Any]], steps: Sequence[int]) -> dict[str, Any]:
    """Accuracy of the teacher and of the student at each step count, their agreement, the mean
    R^2 of ``global`` and the mean seconds per image (to the teacher's answer, to the student's at
    each step count), from the JSON lines."""
    n = len(lines)

    def mean(values) -> float:
        values = list(values)
        return sum(values) / len(values) if values else float("nan")

    out: dict[str, Any] = {
        "images": n,
        "teacher": {"accuracy": mean(x["teacher"] == x["label"] for x in lines),
                    "seconds": mean(x["seconds_teacher"] for x in lines)},
        "student": {},
    }
    for s in sorted(set(steps)):
        k = str(s)
        out["student"][k] = {
            "accuracy": mean(x["student"][k] == x["label"] for x in lines),
            "agreement": mean(x["student"][k] == x["teacher"] for x in lines),
            "r2_global": mean(x["r2"][GLOBAL][k] for x in lines),
            "seconds": mean(x["seconds"][k] for x in lines),
        }
    return out


def format_table(summary: dict[str, Any]) -> str:
    """The summary as a fixed-width table: a teacher row, then a student row per step count."""
    head = f"{'':<16}{'accuracy':>10}{'agreement':>11}{'R^2 global':>12}{'s/image':>10}"
    t = summary["teacher"]
    rows = [head, f"{'teacher':<16}{t['accuracy']:>10.4f}{'-':>11}{'-':>12}{t['seconds']:>10.3f}"]
    for s, v in summary["student"].items():
        rows.append(f"{f'student @ {s}':<16}{v['accuracy']:>10.4f}{v['agreement']:>11.4f}"
                    f"{v['r2_global']:>12.4f}{v['seconds']:>10.3f}")
    return "\n".join(rows)
