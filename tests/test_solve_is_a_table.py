"""What the one-step solve's R^2 measures: how well a linear map fits the cells it was fitted on.
An untrained student wider than the cell count reaches it too, so the docs must not read it as a
speed-up of the student (docs/perceive.md)."""

import numpy as np

from apm.data import image_transform, skimage_photo
from apm.module import APMModule
from apm.perceive import FitRecipe, fit_images


def test_an_untrained_wide_student_fits_the_grid_in_one_solve():
    # 112 px: 8 x 8 = 64 cells per level; 128 random hidden units are more than enough to interpolate
    module = APMModule(teacher="dinov2_tiny", teacher_args={"pretrained": False}, image_size=112,
                       hidden_dims=[128, 128], pe_dim=16, level_dim=8, queries_per_image=64,
                       stats_images=1).eval()
    image = image_transform(112)(skimage_photo("astronaut"))[None]
    solve = FitRecipe(init="fresh", solve_heads=True, max_steps=1, target_r2=2.0)
    (res,) = fit_images(module, image, [0], solve, progress=False)
    before, after = np.mean(list(res.r2_before.values())), np.mean(list(res.r2_after.values()))
    assert before < 0.2 and after > 0.99, (before, after)
    # one gradient step of the same untrained student is nowhere near: the solve fits a table
    (plain,) = fit_images(module, image, [0], FitRecipe(init="fresh", max_steps=1, target_r2=2.0),
                          progress=False)
    assert np.mean(list(plain.r2_after.values())) < 0.5
