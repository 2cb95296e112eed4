"""Images for distillation: a folder (recursive) or, by default, the photographs inside
scikit-image, so the default run needs no download."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T

from apm.errors import ConfigError

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


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: EXIF orientation applied, alpha composited on white, 16-bit and
    float scaled, grayscale, palette and CMYK converted."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        img = Image.fromarray(((a - lo) / (hi - lo if hi > lo else 1) * 255).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img.convert("RGBA"))
    return img.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Open an image file fully (so truncation errors surface here) as RGB."""
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


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


def image_transform(image_size: int, hflip: bool = False) -> T.Compose:
    """Resize the shorter side to ``image_size``, centre-crop a square, float tensor in [0, 1]."""
    ops = [T.ToImage(), T.Resize(image_size, antialias=True), T.CenterCrop(image_size)]
    if hflip:
        ops.append(T.RandomHorizontalFlip())
    return T.Compose(ops + [T.ToDtype(torch.float32, scale=True)])


class ImageDataset(Dataset):
    """Images from files or scikit-image names, as (3, S, S) tensors in [0, 1]."""

    def __init__(self, sources: Sequence[str | Path], image_size: int, hflip: bool = False):
        self.sources = list(sources)
        self.transform = image_transform(image_size, hflip)

    def __len__(self) -> int:
        return len(self.sources)

    def load(self, i: int) -> Image.Image:
        s = self.sources[i]
        return load_image(s) if isinstance(s, Path) else skimage_photo(s)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.load(i))


class APMDataModule(L.LightningDataModule):
    """Training and validation images.

    Args:
        images: A folder of images (searched recursively; jpg, png, bmp, gif, tif, webp, ppm) or
            one image file; default: the photographs embedded in scikit-image.
        image_size: Side of the square input in pixels (a multiple of the patch size).
        batch_size: Images per step.
        val_fraction: Fraction of the images held out for validation (at least one when > 0);
            0 validates on the training images.
        max_images: Use at most this many images (after a seeded shuffle).
        num_workers: DataLoader worker processes.
        hflip: Random horizontal flips of training images.
        seed: Seed of the train/validation split.
    """

    def __init__(self, images: str | None = None, image_size: int = 448, batch_size: int = 8,
                 val_fraction: float = 0.2, max_images: int | None = None, num_workers: int = 2,
                 hflip: bool = False, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.train_set: ImageDataset | None = None
        self.val_set: ImageDataset | None = None

    def sources(self) -> list:
        if self.hparams.images is None:
            return list(SKIMAGE_PHOTOS)
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
        if hp.val_fraction > 0 and n_val == 0:
            warnings.warn("Only one image: validating on the training image.", stacklevel=2)
        train, val = srcs[n_val:], srcs[:n_val] or srcs[n_val:]
        self.train_set = ImageDataset(train, hp.image_size, hp.hflip)
        self.val_set = ImageDataset(val, hp.image_size)

    def _loader(self, ds: Dataset, shuffle: bool, batch_size: int | None = None) -> DataLoader:
        w = self.hparams.num_workers
        return DataLoader(ds, batch_size=batch_size or self.hparams.batch_size, shuffle=shuffle,
                          num_workers=w, persistent_workers=w > 0,
                          pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def stats_dataloader(self) -> DataLoader:
        """Training images in a fixed order, for the level statistics."""
        self.setup("fit")
        return DataLoader(ImageDataset(self.train_set.sources, self.hparams.image_size),
                          batch_size=self.hparams.batch_size, shuffle=False)
