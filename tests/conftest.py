import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)
    yield


@pytest.fixture(scope="session")
def astronaut_224() -> torch.Tensor:
    """A real photograph, (1, 3, 224, 224) in [0, 1]."""
    from apm.data import image_transform, skimage_photo

    return image_transform(224)(skimage_photo("astronaut"))[None]


def saved_checkpoint(module, path: Path) -> dict:
    """Write ``module``'s checkpoint through a real Trainer to ``path``; return it as loaded, for
    tests that edit it (e.g. drop a setting, as a file from an older version would lack it)."""
    import lightning as L

    trainer = L.Trainer(max_steps=0, accelerator="cpu", logger=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return torch.load(path, weights_only=True)
