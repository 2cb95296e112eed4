"""``apm islands``: island figures per image, teacher beside student, a row per level."""

from __future__ import annotations

from apm.analysis import island_figures, teacher_figures
from apm.commands.common import IMAGES_HELP, embedding_args, parser, student_args
from apm.errors import ConfigError
from apm.cli import load_student
from apm.data import load_images
from apm.precision import pick_device
from teachers.base import select_levels


def main(argv: list[str]) -> int:
    """``apm islands``: island figures per image, a row per level."""
    p = parser("islands", "Island figures: for each image a PNG with a row per level and columns "
                "input | teacher islands | student islands. Teacher and student features of one "
                "level are embedded together by t-SNE into 3 components shown as RGB, so one colour "
                "is one place in one embedding. Without --ckpt, --config gives a teacher alone.")
    student_args(p, "checkpoint written by 'apm fit'",
                 "without --ckpt: LightningCLI config(s) naming the teacher (repeat to layer)")
    p.add_argument("--images", nargs="+", required=True, help=IMAGES_HELP)
    p.add_argument("--out", required=True, help="output folder; one <image>.png per image")
    p.add_argument("--k", type=int, default=None,
                   help="k-means clusters for the teacher-student ARI in the row labels (with --ckpt); default 8")
    p.add_argument("--max-iter", type=int, default=1000, help="t-SNE iterations")
    p.add_argument("--display", type=int, default=192, help="pixels per panel")
    embedding_args(p)
    a = p.parse_args(argv)
    device = pick_device(a.device)
    if a.ckpt:
        module = load_student(a.ckpt, a.config, device)
        images = load_images(a.images, module.hparams.image_size, skip_bad=True)
        levels = select_levels(module.levels, a.levels, "--levels")
        paths = []
        for name, img in progress(images, levels, a.method):  # one at a time: t-SNE dominates, memory stays flat
            paths += island_figures(module, img[None], [name], a.out, levels, a.method, a.perplexity,
                                    a.seed, a.k or 8, a.max_iter, a.display)
    elif a.config:
        if a.k is not None:
            raise ConfigError("Setting '--k': the k-means of the teacher-student ARI, and with --config "
                              "alone there is no student (the figures show the teacher only); give "
                              "--ckpt, or drop --k.")
        module = load_student(configs=a.config, device=device)
        teacher, size = module.teacher.to(device), module.hparams.image_size
        images = load_images(a.images, size, skip_bad=True)
        levels = select_levels(teacher.levels, a.levels, "--levels")
        paths = []
        for name, img in progress(images, levels, a.method):
            paths += teacher_figures(teacher, img[None], [name], a.out, levels, a.method,
                                     a.perplexity, a.seed, a.max_iter, a.display)
    else:
        raise ConfigError("apm islands needs --ckpt (teacher and student) or --config (teacher only, "
                          "e.g. --config configs/apm.yaml).")
    for path in paths:
        print(path)
    return 0


def progress(images: list, levels: list, method: str):
    """The images with a bar that names the one being drawn: a t-SNE figure takes minutes on a CPU."""
    from tqdm import tqdm

    bar = tqdm(images, desc="islands", unit="image", dynamic_ncols=True)
    if method == "tsne":
        bar.write(f"islands: {len(images)} image(s) x {len(levels)} level(s) by t-SNE, about half a minute a "
                  f"level of a 448-px image on a CPU core (--method pca: seconds)")
    for name, img in bar:
        bar.set_postfix_str(name)
        yield name, img
