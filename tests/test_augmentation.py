"""Training-image augmentation: random resized crops (data.crop_scale)."""

import pytest
import torch

from apm.data import APMDataModule, image_transform, skimage_photo
from apm.errors import ConfigError


def test_random_resized_crops_cover_the_asked_fraction_and_vary():
    dm = APMDataModule(images="skimage:astronaut", image_size=64, val_fraction=0, num_workers=0,
                       crop_scale=(0.25, 0.25))
    dm.setup("fit")
    centre = image_transform(64)(skimage_photo("astronaut"))
    torch.manual_seed(0)
    crops = [dm.train_set.image(0) for _ in range(4)]
    assert all(c.shape == (3, 64, 64) for c in crops)
    assert not any(torch.allclose(c, centre, atol=0.05) for c in crops)
    assert not torch.allclose(crops[0], crops[1])
    # a quarter of the area is a zoom of about 2x: smoother at 64 px than the whole image
    detail = lambda x: (x[:, 1:] - x[:, :-1]).abs().mean()  # noqa: E731
    assert sum(detail(c) for c in crops) / 4 < detail(centre)
    assert torch.allclose(dm.val_set.image(0), centre)  # validation keeps the centre square


@pytest.mark.parametrize("scale", [(0.0, 1.0), (0.8, 0.5), (0.5, 1.5), (0.5,)])
def test_bad_crop_scale_is_named(scale):
    dm = APMDataModule(images="skimage:astronaut", image_size=64, num_workers=0, crop_scale=scale)
    with pytest.raises(ConfigError, match="data.crop_scale"):
        dm.setup("fit")


def test_feature_cache_refuses_crops():
    dm = APMDataModule(images="skimage:astronaut", image_size=64, num_workers=0, crop_scale=(0.5, 1.0))
    with pytest.raises(ConfigError, match="data.crop_scale"):
        dm.cache_sources()
