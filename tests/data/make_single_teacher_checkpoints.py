"""Writes the single-teacher checkpoints that tests/test_multi_teacher.py loads, with the features
the writing code computed, so that later code is held to them bit for bit.

Run once, from the repository root, with the code whose checkpoints must keep loading (these files
were written at commit 55e6fac, before ``model.teachers`` existed):

    python tests/data/make_single_teacher_checkpoints.py
"""

from __future__ import annotations

from pathlib import Path

import torch

from apm.data import image_transform, skimage_photo
from apm.module import APMModule
from tests.conftest import saved_checkpoint

HERE = Path(__file__).resolve().parent
RUNS = {
    "dinov2_tiny": dict(teacher="dinov2_tiny", teacher_args={"pretrained": False}, image_size=56),
    "mvitv2_tiny": dict(teacher="mvitv2_tiny", teacher_args={"pretrained": False, "levels": [1, 3]},
                        image_size=64),
}


def main() -> None:
    for name, kw in RUNS.items():
        torch.manual_seed(0)
        image = image_transform(kw["image_size"])(skimage_photo("astronaut"))[None]
        m = APMModule(**kw, hidden_dims=[32, 32], pe_dim=16, level_dim=4, queries_per_image=0,
                      stats_images=1)
        m.fit_statistics([image])
        opt = torch.optim.AdamW(m.student.parameters(), lr=1e-2)
        feats = m.targets(image)
        for _ in range(5):  # trained weights, not just the seeded initial ones
            loss, _ = m.distillation_loss(image, feats)
            opt.zero_grad()
            loss.backward()
            opt.step()
        m.eval()
        saved_checkpoint(m, HERE / f"single_{name}.ckpt")
        torch.save({"image": image, "teacher": m.targets(image), "student": m.predict_features(image),
                    "levels": [l.name for l in m.levels]}, HERE / f"single_{name}_features.pt")
        print(name, [l.name for l in m.levels])


if __name__ == "__main__":
    main()
