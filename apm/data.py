"""Images for distillation: a folder (recursive) or, by default, the photographs inside
scikit-image, so the default run needs no download."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import NamedTuple, Sequence

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T

from apm.errors import ConfigError, UnreadableImageError
from apm.skipping import SkipBadImages, SkipLog, SkippingDataLoader, failure_reason, first_readable
from apm.skipping import log as skip_log

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

# Photographs shipped inside the scikit-image wheel (no pooch download needed).
SKIMAGE_PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "cat", "stereo_motorcycle", "immunohistochemistry",
    "hubble_deep_field", "retina", "camera", "coins", "moon", "brick", "grass", "gravel", "clock",
)


def skimage_photo(name: str) -> Image.Image:
    """One of scikit-image's embedded photographs as an RGB PIL image."""
    import skimage.data

    arr = getattr(skimage.data, name)()
    if isinstance(arr, tuple):  # stereo pairs: the left view
        arr = arr[0]
    return to_rgb(Image.fromarray(np.asarray(arr)))


def skimage_names(spec: str, setting: str) -> list[str]:
    """The photograph names of a ``skimage:NAME[,NAME...]`` spec; ConfigError naming ``setting``
    when one is not embedded in scikit-image."""
    names = spec[len("skimage:"):].split(",")
    bad = [n for n in names if n not in SKIMAGE_PHOTOS]
    if bad:
        raise ConfigError(
            f"Setting {setting!r}: {bad} are not embedded scikit-image photographs; choose from "
            f"{', '.join(SKIMAGE_PHOTOS)} (e.g. 'skimage:astronaut,coffee')."
        )
    return names


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: EXIF orientation applied, alpha composited on white, 16-bit and
    float scaled, grayscale, palette and CMYK converted."""
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block should not cost the pixels
        pass
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.nan_to_num(np.asarray(img, dtype=np.float64))
        lo, hi = float(a.min()), float(a.max())
        img = Image.fromarray(((a - lo) / (hi - lo if hi > lo else 1) * 255).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img.convert("RGBA"))
    return img.convert("RGB")


# Decoded-pixel limit (PIL's own decompression-bomb guard is about 179M): a 16k x 8k image.
MAX_PIXELS = 2**27


@contextlib.contextmanager
def _own_size_limit():
    """PIL's global decompression-bomb check off inside the block: ``load_image`` applies its own
    limit after a JPEG has been set to decode at reduced scale, so large photographs still load."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def load_image(path: str | Path, size: int | None = None, min_side: int = 1,
               max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open an image file fully (so truncation errors surface here) as 8-bit RGB.

    Args:
        path: The image file.
        size: The side it will be resized to, if known: a JPEG then decodes at the smallest of
            1/1, 1/2, 1/4, 1/8 scale that keeps both sides >= ``size`` (fast, little memory).
        min_side: Smallest accepted shorter side in pixels.
        max_pixels: Largest accepted decoded size in pixels (after any reduced-scale decoding).

    Raises:
        UnreadableImageError: naming the file and the reason (not an image, corrupt or truncated,
            too small, too large).
    """
    path = Path(path)
    try:
        with _own_size_limit(), Image.open(path) as img:
            w, h = img.size
            if size and img.format == "JPEG":
                img.draft(None, (size, size))
            if img.size[0] * img.size[1] > max_pixels:
                raise UnreadableImageError(
                    f"{path}: {w}x{h} pixels is more than 'data.max_pixels' ({max_pixels}); raise "
                    f"that setting if the file is trusted, or downscale it"
                )
            img.load()
            rgb = to_rgb(img)
    except UnreadableImageError:
        raise
    except Exception as e:  # PIL raises many types for broken files; none may end a run
        msg = str(e).splitlines()[0][:200] if str(e) else ""
        raise UnreadableImageError(f"{path}: {type(e).__name__}{': ' + msg if msg else ''}") from None
    if min(rgb.size) < min_side:
        raise UnreadableImageError(
            f"{path}: {rgb.size[0]}x{rgb.size[1]} pixels is smaller than 'data.min_side' ({min_side}); "
            f"set 'data.min_side: 1' to upscale such images instead of skipping them"
        )
    return rgb


def read_source(source: str | Path, size: int | None = None, min_side: int = 1,
                max_pixels: int = MAX_PIXELS) -> Image.Image:
    """One image as RGB: a file given as a ``Path`` (``load_image``), or a photograph embedded in
    scikit-image given by its name."""
    if isinstance(source, Path):
        return load_image(source, size, min_side, max_pixels)
    return skimage_photo(source)


def original_size(source: str | Path) -> tuple[int, int]:
    """(rows, columns) of an image as ``read_source`` reads it at full scale (EXIF rotation
    applied), from the file's header alone."""
    if not isinstance(source, Path):
        img = skimage_photo(source)
        return img.height, img.width
    with _own_size_limit(), Image.open(source) as img:
        w, h = img.size
        turned = img.getexif().get(0x0112) in (5, 6, 7, 8)  # EXIF orientations with a quarter turn
    return (w, h) if turned else (h, w)


def read_image(source: str | Path, image_size: int) -> torch.Tensor:
    """One image as every tool feeds it to a student: (3, S, S) in [0, 1] (``read_source``, then
    ``image_transform``); UnreadableImageError naming a file that cannot be used."""
    return image_transform(image_size)(read_source(source, image_size))


class Photo(NamedTuple):
    """An image read by ``read_images``: its name, the image (3, S, S) in [0, 1] and its original
    size (rows, columns) (``original_size``)."""

    name: str
    image: torch.Tensor
    size: tuple[int, int]


def read_images(specs: Sequence[str], image_size: int, setting: str = "--images", skip_bad: bool = False,
                skipped: list[str] | None = None, draft: bool = True) -> list[Photo]:
    """The one image reader of the tools, the API and the experiments: ``Photo`` s of image files,
    folders (searched recursively) and ``skimage:NAME[,NAME...]`` (photographs embedded in
    scikit-image), each as ``read_image`` makes it. A missing path or an unreadable file is an
    error, or with ``skip_bad`` a warning naming it (its message appended to ``skipped``; a count at
    the end); ConfigError when no image is left. Two files with one stem get distinct names.
    ``draft``: a large JPEG decodes at a reduced scale that still covers ``image_size`` (fast;
    False decodes every file at full scale)."""
    skipped = [] if skipped is None else skipped
    tf, out = image_transform(image_size), []

    log = SkipLog()  # the one policy: each bad input named once, a count at the end

    def bad(message: str, name: str | None = None, reason: str | None = None) -> None:
        if not skip_bad:
            raise ConfigError(message)
        log.record([(name, reason)] if name else [(message, "")])
        skipped.append(message)

    for spec in specs:
        sources = skimage_names(spec, setting) if spec.startswith("skimage:") else find_images(spec) if Path(spec).exists() else None
        if sources is None:
            bad(f"Setting {setting!r}: {spec!r} does not exist. Give image files, folders of images, "
                f"or skimage:NAME for an embedded photograph.")
        elif not sources:
            bad(f"Setting {setting!r}: no image files under {spec!r}.")
        for src in sources or []:
            try:
                pil = read_source(src, image_size if draft else None)
                size = (pil.height, pil.width) if not draft or not isinstance(src, Path) else original_size(src)
            except UnreadableImageError as e:
                bad(f"Setting {setting!r}: {e}", str(src), failure_reason(e, str(src)))
                continue
            out.append(Photo(Path(src).stem, tf(pil), size))
    log.summary(f"; {len(out)} image(s) loaded")
    if not out:
        raise ConfigError(f"Setting {setting!r}: no readable image among {list(specs)}.")
    seen: dict[str, int] = {}
    for k, p in enumerate(out):  # two files with one stem must not overwrite each other's figure
        seen[p.name] = seen.get(p.name, 0) + 1
        if seen[p.name] > 1:
            out[k] = p._replace(name=f"{p.name}-{seen[p.name]}")
    return out


def load_images(specs: Sequence[str], image_size: int, setting: str = "--images",
                skip_bad: bool = False) -> list[tuple[str, torch.Tensor]]:
    """``read_images`` as (name, image) pairs."""
    return [(p.name, p.image) for p in read_images(specs, image_size, setting, skip_bad)]


def find_images(root: str | Path) -> list[Path]:
    """Image files under ``root`` (recursive, sorted), by extension, case-insensitive."""
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise ConfigError(
            f"Setting 'data.images': {str(root)!r} does not exist. Give a folder of images (searched "
            f"recursively), one image file, or leave it unset for the photographs inside scikit-image."
        )
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def image_transform(image_size: int, hflip: bool = False,
                    crop_scale: Sequence[float] | None = None) -> T.Compose:
    """Resize the shorter side to ``image_size``, centre-crop a square, float tensor in [0, 1];
    with ``crop_scale`` (lo, hi) a random crop of that fraction of the area instead (aspect 3:4
    to 4:3), resized to the square."""
    if crop_scale:
        ops = [T.ToImage(), T.RandomResizedCrop(image_size, scale=tuple(crop_scale), antialias=True)]
    else:
        ops = [T.ToImage(), T.Resize(image_size, antialias=True), T.CenterCrop(image_size)]
    if hflip:
        ops.append(T.RandomHorizontalFlip())
    return T.Compose(ops + [T.ToDtype(torch.float32, scale=True)])


def batch_images(batch: torch.Tensor | Sequence) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images, dataset indices) of a batch: APMDataModule's loaders give (images, indices); a
    plain loader of image tensors gives images alone (indices None)."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    return batch[0], batch[1]


class ImageDataset(Dataset):
    """Images from files or scikit-image names: item ``i`` is (image (3, S, S) in [0, 1], i); the
    index lets a teacher-feature cache find the image's features."""

    def __init__(self, sources: Sequence[str | Path], image_size: int, hflip: bool = False,
                 min_side: int = 1, max_pixels: int = MAX_PIXELS, crop_scale: Sequence[float] | None = None):
        self.sources = list(sources)
        self.image_size = image_size
        self.hflip = hflip
        self.transform = image_transform(image_size, hflip, crop_scale)
        self.min_side, self.max_pixels = min_side, max_pixels

    def __len__(self) -> int:
        return len(self.sources)

    def load(self, i: int) -> Image.Image:
        """Image ``i`` as RGB; UnreadableImageError for a file that cannot be used."""
        return read_source(self.sources[i], self.image_size, self.min_side, self.max_pixels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.load(i)), i

    def image(self, i: int) -> torch.Tensor:
        """Image ``i`` alone (3, S, S)."""
        return self[i][0]


class APMDataModule(L.LightningDataModule):
    """Training and validation images.

    Args:
        images: A folder of images (searched recursively; jpg, png, bmp, gif, tif, webp, ppm), one
            image file, or ``skimage:NAME[,NAME...]`` for chosen embedded photographs; default: all
            the photographs embedded in scikit-image.
        image_size: Side of the square input in pixels (a multiple of the patch size).
        batch_size: Images per step.
        val_fraction: Fraction of the images held out for validation (at least one when > 0);
            0 validates on the training images.
        max_images: Use at most this many images (after a seeded shuffle).
        num_workers: DataLoader worker processes.
        hflip: Random horizontal flips of training images.
        crop_scale: Random resized crops of training images: (lo, hi), the fraction of the image's
            area each crop covers (e.g. [0.35, 1.0]); default off (the centre square).
        seed: Seed of the train/validation split.
        min_side: Image files whose shorter side is below this many pixels (icons, thumbnails:
            less than one 14-pixel patch by default) are skipped; 1 upscales every image instead.
        max_pixels: Image files larger than this many pixels are skipped (a decompression-bomb
            guard); JPEGs are first decoded at reduced scale (down to 1/8), so large photographs
            load. Unreadable files are skipped with one warning each and a count per epoch.
    """

    def __init__(self, images: str | None = None, image_size: int = 448, batch_size: int = 8,
                 val_fraction: float = 0.2, max_images: int | None = None, num_workers: int = 2,
                 hflip: bool = False, seed: int = 0, min_side: int = 14, max_pixels: int = MAX_PIXELS,
                 crop_scale: tuple[float, float] | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.train_set: ImageDataset | None = None
        self.val_set: ImageDataset | None = None
        self.skip_log = SkipLog()  # unreadable files met by any loader, reported once each

    def sources(self) -> list:
        if self.hparams.images is None:
            return list(SKIMAGE_PHOTOS)
        if self.hparams.images.startswith("skimage:"):
            return skimage_names(self.hparams.images, "data.images")
        found = find_images(self.hparams.images)
        if not found:
            raise ConfigError(
                f"Setting 'data.images': no image files under {self.hparams.images!r} (looked for "
                f"{', '.join(IMAGE_EXTENSIONS)}, recursively). Point it at a folder of images."
            )
        return found

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        if not 0 <= hp.val_fraction < 1:
            raise ConfigError(f"Setting 'data.val_fraction': {hp.val_fraction} must be in [0, 1).")
        srcs = self.sources()
        order = torch.randperm(len(srcs), generator=torch.Generator().manual_seed(hp.seed)).tolist()
        srcs = [srcs[i] for i in order][: hp.max_images]
        n_val = 0 if hp.val_fraction == 0 or len(srcs) < 2 else max(1, round(hp.val_fraction * len(srcs)))
        train, val = srcs[n_val:], srcs[:n_val] or srcs[n_val:]
        limits = dict(min_side=hp.min_side, max_pixels=hp.max_pixels)
        if hp.crop_scale is not None and not (len(hp.crop_scale) == 2 and 0 < hp.crop_scale[0] <= hp.crop_scale[1] <= 1):
            raise ConfigError(f"Setting 'data.crop_scale': {hp.crop_scale} must be [lo, hi] with "
                              f"0 < lo <= hi <= 1 (fractions of the image's area), e.g. [0.35, 1.0].")
        self.train_set = ImageDataset(train, hp.image_size, hp.hflip, crop_scale=hp.crop_scale, **limits)
        self.val_set = ImageDataset(val, hp.image_size, **limits)
        self._check_readable()
        if hp.val_fraction > 0 and n_val == 0:  # after the check: an unreadable file is no image
            skip_log.warning("Only one image: validating on the training image.")

    def _check_readable(self) -> None:
        """ConfigError before training when no training image can be read; validation falls back
        to the training images when none of its own can."""
        found, failures = first_readable(self.train_set)
        if found is None:
            listed = "; ".join(f"{n}: {r}" for n, r in failures[:5])
            raise ConfigError(
                f"Setting 'data.images': none of the {len(failures)} training image files under "
                f"{self.hparams.images!r} can be used ({listed}{' ...' if len(failures) > 5 else ''}). "
                f"Point it at a folder of readable images (jpg, png, bmp, gif, tif, webp, ppm); "
                f"'data.min_side' and 'data.max_pixels' set which sizes are accepted."
            )
        if self.val_set.sources != self.train_set.sources:
            found, failures = first_readable(self.val_set)
            if found is None:
                self.skip_log.record(failures)  # named once, like every skipped file
                skip_log.warning("No validation image can be read: validating on the training images.")
                self.val_set.sources = list(self.train_set.sources)

    def _loader(self, ds: Dataset, shuffle: bool, batch_size: int | None = None,
                label: str = "images") -> DataLoader:
        w = self.hparams.num_workers
        return SkippingDataLoader(SkipBadImages(ds), batch_size=batch_size or self.hparams.batch_size,
                                  shuffle=shuffle, num_workers=w, persistent_workers=w > 0,
                                  pin_memory=torch.cuda.is_available(), skip_log=self.skip_log,
                                  label=label)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True, label="training images")

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False, label="validation images")

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False, label="prediction images")

    def cache_sources(self) -> list:
        """The training images in dataset order, which a teacher-feature cache is keyed by;
        ConfigError when the training images are flipped (a cache holds unflipped features)."""
        if self.hparams.hflip or self.hparams.crop_scale:
            which = "data.hflip: true" if self.hparams.hflip else "data.crop_scale"
            raise ConfigError(f"Setting 'model.feature_cache' stores the features of unaugmented "
                              f"images; it cannot be used with '{which}'. Unset one.")
        self.setup("fit")
        return list(self.train_set.sources)

    def stats_dataloader(self) -> DataLoader:
        """Training images in a fixed order, for the level statistics."""
        self.setup("fit")
        hp = self.hparams
        ds = ImageDataset(self.train_set.sources, hp.image_size, min_side=hp.min_side,
                          max_pixels=hp.max_pixels)
        return SkippingDataLoader(SkipBadImages(ds), batch_size=hp.batch_size, shuffle=False,
                                  skip_log=self.skip_log, label="statistics images")

    def teardown(self, stage: str) -> None:
        if stage == "fit":
            self.skip_log.summary()
