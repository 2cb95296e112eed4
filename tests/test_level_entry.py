"""Where the level code enters: the paper's first layer, or late (level-free work once per location)."""

import lightning as L
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.legacy import flat_settings
from apm.module import APMModule
from apm.student import APMStudent
from teachers import Level
from tests.conftest import saved_checkpoint

LEVELS = [Level("a", (8, 8), 12), Level("b", (4, 4), 20), Level("c", (8, 8), 6), Level("rgb", (8, 8), 3)]
DESIGNS = ("first", "late")
TINY = dict(teacher="dinov2_tiny", teacher_args={"pretrained": False}, image_size=56,
            hidden_dims=[32, 32, 24], pe_dim=16, level_dim=8, queries_per_image=24, stats_images=1)


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    from apm.data import image_transform, skimage_photo

    return image_transform(56)(skimage_photo("astronaut"))


def make_student(entry: str, hidden=(48, 40, 32)) -> APMStudent:
    torch.manual_seed(0)
    return APMStudent(LEVELS, image_size=64, patch_size=8, pe_dim=32, level_dim=8,
                      hidden_dims=list(hidden), level_entry=entry)


@pytest.mark.parametrize("entry", DESIGNS)
def test_a_single_query_answers_as_the_dense_pass_and_the_plain_path(entry):
    s = make_student(entry)
    x = torch.rand(2, 3, 64, 64)
    dense = s.dense(x)
    col = s.trigger(x)
    for lvl, d in enumerate(dense):
        flat = d.flatten(1, 2)
        coords = s.coords(lvl)
        for i in (0, 5, coords.shape[0] - 1):
            torch.testing.assert_close(s.query(x, lvl, coords[i : i + 1])[:, 0], flat[:, i])
            alone = s.predict_queries(x, torch.tensor([lvl]), coords[i : i + 1])[lvl][:, 0]
            torch.testing.assert_close(alone, flat[:, i])
        # the unfactorized query [T, PE, E] (E concatenated where it enters) gives the same answers
        plain = s.decode(lvl, s.first(s.query_vectors(col, lvl, coords)))
        torch.testing.assert_close(plain, flat, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s(x, [None] * len(LEVELS))[lvl], flat)


@pytest.mark.parametrize("entry", DESIGNS)
def test_a_query_does_not_depend_on_the_queries_asked_alongside(entry):
    s = make_student(entry)
    x = torch.rand(2, 3, 64, 64)
    dense = [d.flatten(1, 2) for d in s.dense(x)]
    shared = torch.tensor([[3, 9, 60], [0, 1, 2]])
    # levels a and c share a tensor (and so the level-free work); b and rgb ask other locations
    preds = s(x, [shared, torch.tensor([[15], [4]]), shared, torch.tensor([[7, 8], [63, 62]])])
    for lvl, (p, loc) in enumerate(zip(preds, [shared, torch.tensor([[15], [4]]), shared,
                                                torch.tensor([[7, 8], [63, 62]])])):
        torch.testing.assert_close(p, dense[lvl].gather(1, loc[..., None].expand(-1, -1, p.shape[-1])))
    # a stream mixing levels and repeating coordinates in one chunk answers each query as alone
    ids = torch.tensor([0, 2, 1, 3, 0, 2])
    coords = torch.stack([s.coords(0)[9], s.coords(2)[9], s.coords(1)[3], s.coords(3)[9],
                          s.coords(0)[40], s.coords(2)[9]])
    got = s.predict_queries(x, ids, coords, chunk=4)
    want = {0: [9, 40], 1: [3], 2: [9, 9], 3: [9]}
    for lvl, locs in want.items():
        torch.testing.assert_close(got[lvl], dense[lvl][:, locs])


def dense_flops(s: APMStudent, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        s.dense(x)
    return fc.get_total_flops()


def expected_flops(s: APMStudent, hidden: list[int], entry: str) -> int:
    """Matmul FLOPs (2 per multiply-add) of a dense pass over all levels, from the layer sizes."""
    conv = 2 * s.column_dim * 3 * s.patch_size**2
    col = 2 * s.column_dim * hidden[0]
    grids = {l.grid for l in s.levels}
    n = {g: g[0] * g[1] for g in grids}
    pos = sum(2 * s.pe_dim * hidden[0] * n[g] for g in grids)
    mid = [2 * a * b for a, b in zip(hidden[:-1], hidden[1:])]  # per query, the hidden layers
    level_terms = 2 * s.level_dim * (hidden[0] if entry == "first" else hidden[-1]) * len(s.levels)
    heads = sum(2 * hidden[-1] * l.dim * n[l.grid] for l in s.levels)
    if entry == "first":  # every (location, level) runs every layer
        trunk = sum(mid) * sum(n[l.grid] for l in s.levels)
    else:  # every location runs every layer once; the last one's level part is the level term
        trunk = sum(mid) * sum(n.values())
    return conv + col + pos + level_terms + trunk + heads


def test_late_level_entry_divides_the_dense_cost_as_the_layer_sizes_say():
    hidden = [64, 64, 64, 48]
    x = torch.rand(1, 3, 64, 64)
    counted = {e: dense_flops(make_student(e, hidden), x) for e in DESIGNS}
    expected = {e: expected_flops(make_student(e, hidden), hidden, e) for e in DESIGNS}
    assert counted == expected
    # 3 of the 4 levels share the 8x8 grid: the hidden layers run 80 times instead of 208
    assert counted["late"] / counted["first"] == pytest.approx(expected["late"] / expected["first"])
    assert counted["late"] < 0.5 * counted["first"]


def test_late_training_samples_one_set_of_locations_per_grid_and_runs_the_trunk_once(image):
    for entry, calls in (("late", 1), ("first", 3)):
        m = APMModule(**TINY, level_entry=entry)
        locs = m.sample_locations(2, torch.device("cpu"))
        assert (locs[0] is locs[-1]) == (entry == "late")  # DINOv2 levels and rgb share a grid
        seen = []
        locate = m.student.locate
        m.student.locate = lambda first: seen.append(first.shape) or locate(first)
        m.student(image[None].expand(2, -1, -1, -1), locs)
        assert len(seen) == (1 if entry == "late" else len(m.levels)), seen


@pytest.mark.parametrize("entry", DESIGNS)
def test_each_design_learns_one_photograph(entry, image):
    L.seed_everything(0)
    from apm.data import APMDataModule

    model = APMModule(teacher="dinov2_tiny", teacher_args={"pretrained": False}, image_size=112,
                      hidden_dims=[128, 128, 128], pe_dim=64, level_dim=16, queries_per_image=0,
                      lr=2e-3, warmup_steps=10, stats_images=1, level_entry=entry)
    data = APMDataModule(images="skimage:astronaut", image_size=112, batch_size=1, val_fraction=0,
                         num_workers=0)
    trainer = L.Trainer(max_steps=150, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, data)
    data.setup()
    res = model.evaluate(data.val_set.image(0)[None])
    r2 = torch.stack([m["r2"] for m in res.values()]).mean().item()
    assert r2 > 0.8, (entry, {k: m["r2"].item() for k, m in res.items()})


def test_a_checkpoint_without_the_setting_loads_as_the_first_design(tmp_path, image):
    old = APMModule(**TINY, level_entry="first")
    old.standardizer.update(old.targets(image[None]))
    old.standardizer.finalize()
    path = tmp_path / "old.ckpt"
    ckpt = saved_checkpoint(old, path)
    ckpt["hyper_parameters"] = flat_settings(ckpt["hyper_parameters"], "level_entry")
    torch.save(ckpt, path)
    want = old.eval().predict_features(image[None])
    loaded = APMModule.from_checkpoint(path)
    assert loaded.student.level_entry == loaded.student_settings.level_entry == "first"
    for a, b in zip(loaded.predict_features(image[None]), want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # resuming a run (a module built with today's default, then on_load_checkpoint) adopts it too
    resumed = APMModule(**TINY)
    assert resumed.student.level_entry == "late"
    resumed.on_load_checkpoint(ckpt)
    resumed.load_state_dict(ckpt["state_dict"])
    assert resumed.student.level_entry == "first"
    for a, b in zip(resumed.eval().predict_features(image[None]), want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
