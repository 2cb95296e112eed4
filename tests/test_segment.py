"""apm segment: BSDS region measures against hand-computed values, ground-truth readers, the crop of
ground truth, the nesting of islands across levels, and the command end to end (tiny random
teacher, scikit-image photographs, ground truth made here)."""

import json
import math

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from sklearn.metrics import adjusted_rand_score, mutual_info_score, rand_score

from apm import segment
from apm.cli import main
from apm.data import image_transform, skimage_photo
from tests.conftest import CONFIGS

# S (machine) and G (annotator) on 6 pixels, as 2x3 maps:
#   S = [[0 0 0]    G = [[0 0 1]
#        [1 1 1]]        [1 1 1]]
# S regions: X = {p0 p1 p2} (3), Y = {p3 p4 p5} (3); G regions: A = {p0 p1} (2), B = {p2 .. p5} (4).
# Contingency (rows X, Y; columns A, B): [[2, 1], [0, 3]].
S = np.array([[0, 0, 0], [1, 1, 1]])
G = np.array([[0, 0, 1], [1, 1, 1]])
# covering of G by S: A's best IoU is with X, 2 / (3 + 2 - 2) = 2/3; B's with Y, 3 / (3 + 4 - 3) = 3/4;
#   (2 * 2/3 + 4 * 3/4) / 6 = (4/3 + 3) / 6 = 13/18
COVERING = 13 / 18
# Rand index: 15 pixel pairs. Together in S: C(3,2) + C(3,2) = 6; in G: C(2,2) + C(4,2) = 7; in both:
#   C(2,2) + C(1,2) + C(0,2) + C(3,2) = 1 + 0 + 0 + 3 = 4. Apart in both: 15 - 6 - 7 + 4 = 6.
#   RI = (4 + 6) / 15 = 2/3
RAND = 2 / 3
# VI in bits: H(S) = 1; H(G) = 1/3 log2 3 + 2/3 log2 3/2; H(S, G) = 1/3 log2 3 + 1/6 log2 6 + 1/2 (cells
#   2/6, 1/6, 3/6). VI = 2 H(S, G) - H(S) - H(G) = (2/3 + 1/3 - 1/3 - 2/3) log2 3 + 1/3 + 1 - 1 + 2/3 = 1
VI = 1.0
# ARI: sum C(n_ij, 2) = 4, rows 6, columns 7, pairs 15: expected 6 * 7 / 15 = 2.8, max (6 + 7) / 2 = 6.5;
#   (4 - 2.8) / (6.5 - 2.8) = 12/37
ARI = 12 / 37


def test_measures_match_the_hand_computed_values():
    got = segment.region_scores(S, G)
    assert got == pytest.approx({"covering": COVERING, "pri": RAND, "vi": VI, "ari": ARI}, abs=1e-12)
    assert segment.covering(S, G) == pytest.approx(COVERING)
    assert segment.pri(S, G) == pytest.approx(RAND)
    assert segment.vi(S, G) == pytest.approx(VI)
    assert segment.ari(S, G) == pytest.approx(ARI)
    # a second annotator who drew S itself (covering 1, RI 1, VI 0, ARI 1): each measure is the
    # mean over the two annotators, as the benchmark takes it
    two = segment.region_scores(S, [G, S])
    assert two == pytest.approx({"covering": (COVERING + 1) / 2, "pri": (RAND + 1) / 2, "vi": VI / 2,
                                 "ari": (ARI + 1) / 2}, abs=1e-12)
    # covering is not symmetric: S covered by G = (3 * 2/3 + 3 * 3/4) / 6 = 17/24
    assert segment.covering(G, S) == pytest.approx(17 / 24)


def test_measures_agree_with_scikit_learn_and_ignore_label_names():
    rng = np.random.default_rng(0)
    for _ in range(4):
        a, b = rng.integers(0, 5, (9, 11)), rng.integers(0, 3, (9, 11))
        got = segment.region_scores(a, b)
        assert got["ari"] == pytest.approx(adjusted_rand_score(b.ravel(), a.ravel()), abs=1e-12)
        assert got["pri"] == pytest.approx(rand_score(b.ravel(), a.ravel()), abs=1e-12)
        h = lambda x: -sum(p * math.log(p) for p in np.bincount(x.ravel()) / x.size if p)  # noqa: E731
        nats = h(a) + h(b) - 2 * mutual_info_score(a.ravel(), b.ravel())
        assert got["vi"] == pytest.approx(nats / math.log(2), abs=1e-9)
        # renaming the regions of either map changes nothing
        pa, pb = rng.permutation(5) + 100, rng.permutation(3) * 7
        assert segment.region_scores(pa[a], pb[b]) == pytest.approx(got, abs=1e-12)
        # identical maps: covering 1, PRI 1, VI 0, ARI 1
        assert segment.region_scores(a, pa[a]) == pytest.approx(
            {"covering": 1.0, "pri": 1.0, "vi": 0.0, "ari": 1.0}, abs=1e-12)


def test_grid_scores_equal_the_scores_of_the_upsampled_map():
    rng = np.random.default_rng(1)
    truth = segment.Truth("x", None, [rng.integers(0, 4, (56, 56)), rng.integers(0, 6, (56, 56))])
    for grid in ((4, 4), (16, 16), (5, 7)):
        labels = rng.integers(0, 5, grid)
        assert truth.score(labels) == pytest.approx(
            segment.region_scores(segment.upsample_labels(labels, (56, 56)), truth.maps), abs=1e-12)


def test_ods_picks_one_k_for_the_set_and_ois_the_best_k_per_image():
    m = lambda c, v: {"covering": c, "pri": c, "vi": v, "ari": c}  # noqa: E731
    per_image = [{2: m(0.5, 2.0), 4: m(0.7, 1.0)}, {2: m(0.9, 0.5), 4: m(0.6, 1.5)}]
    out = segment.ods_ois(per_image)
    # covering: mean at k=2 (0.5 + 0.9) / 2 = 0.7, at k=4 (0.7 + 0.6) / 2 = 0.65 -> ODS 0.7 at k=2;
    # OIS (0.7 + 0.9) / 2 = 0.8. VI (lower is better): k=2 1.25, k=4 1.25 -> 1.25; OIS (1.0 + 0.5) / 2
    assert out["covering"] == {"ods": pytest.approx(0.7), "ods_k": 2, "ois": pytest.approx(0.8)}
    assert out["vi"]["ods"] == pytest.approx(1.25) and out["vi"]["ois"] == pytest.approx(0.75)
    # the benchmark pools covering over all annotators' regions: an image with 3 annotators weighs
    # 3 times one with 1. k=2: (3 * 0.5 + 0.9) / 4 = 0.6, k=4: (3 * 0.7 + 0.6) / 4 = 0.675 -> ODS 0.675
    # at k=4; OIS (3 * 0.7 + 0.9) / 4 = 0.75. PRI and VI stay plain means.
    pooled = segment.ods_ois(per_image, weights=[3, 1])
    assert pooled["covering"] == {"ods": pytest.approx(0.675), "ods_k": 4, "ois": pytest.approx(0.75)}
    assert pooled["pri"] == out["pri"] and pooled["vi"] == out["vi"]


def bsds_mat(path, maps) -> None:
    """A .mat file in the BSDS layout: a 1xN cell array `groundTruth` of structs with the fields
    Segmentation (uint16, labels from 1) and Boundaries."""
    cell = np.empty((1, len(maps)), dtype=object)
    for i, m in enumerate(maps):
        struct = np.empty((1, 1), dtype=[("Segmentation", object), ("Boundaries", object)])
        struct[0, 0] = (np.asarray(m, dtype=np.uint16) + 1, np.zeros_like(m, dtype=np.uint8))
        cell[0, i] = struct
    scipy.io.savemat(str(path), {"groundTruth": cell})


def test_ground_truth_readers_mat_and_png(tmp_path):
    a, b = np.array([[0, 0, 1], [2, 2, 1]]), np.array([[0, 1, 1], [0, 1, 1]])
    bsds_mat(tmp_path / "one.mat", [a, b])
    (tmp_path / "two").mkdir()
    Image.fromarray(a.astype(np.uint8) * 40, "L").save(tmp_path / "two" / "1.png")
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[b == 1] = (255, 0, 10)  # a colour PNG: each distinct colour one region
    Image.fromarray(rgb).save(tmp_path / "two" / "2.png")
    Image.fromarray(b.astype(np.uint16) * 300).save(tmp_path / "three.png")  # 16-bit labels
    found = segment.find_truth(tmp_path)
    assert {k: v.name for k, v in found.items()} == {"one": "one.mat", "two": "two", "three": "three.png"}
    for name, want in (("one", [a, b]), ("two", [a, b]), ("three", [b])):
        maps = segment.read_truth(found[name], (2, 3))
        assert len(maps) == len(want)
        for got, w in zip(maps, want):  # the same partition (label values may differ)
            assert segment.region_scores(got, w)["covering"] == 1.0 and got.shape == w.shape
    assert segment.read_mat(tmp_path / "one.mat")[0].min() == 1  # BSDS labels start at 1
    with pytest.raises(segment.BadGroundTruth, match="one.mat.*2x3.*3x2"):
        segment.read_truth(found["one"], (3, 2))


def test_bad_or_missing_ground_truth_is_named_and_skipped(tmp_path):
    good = np.zeros((20, 30), int)
    good[:, 15:] = 1
    bsds_mat(tmp_path / "good.mat", [good])
    (tmp_path / "corrupt.mat").write_bytes(b"MATLAB 5.0 MAT-file, but then nothing")
    scipy.io.savemat(str(tmp_path / "other.mat"), {"labels": good})  # not the BSDS layout
    bsds_mat(tmp_path / "small.mat", [good[:10]])  # not its image's size
    names = ["good", "corrupt", "other", "small", "absent"]
    with pytest.warns(UserWarning) as caught:
        truths, skipped = segment.match_truth(names, [(20, 30)] * 5, tmp_path, 16)
    said = " ".join(str(w.message) for w in caught)
    assert list(truths) == ["good"] and len(skipped) == 4
    for name in ("corrupt.mat", "other.mat", "groundTruth", "small.mat", "absent"):
        assert name in said, (name, said)
    assert truths["good"].maps[0].shape == (16, 16)


@pytest.mark.parametrize("size", [(300, 200), (200, 300)])
def test_ground_truth_is_cropped_and_resized_as_its_image(size):
    """A photograph with a red region and its label map stay aligned through the image's resize
    and centre crop: they disagree only on the region's blurred edge."""
    w, h = size
    rgb = np.zeros((h, w, 3), np.uint8)
    labels = np.zeros((h, w), int)
    ys, xs = np.mgrid[:h, :w]
    region = ((ys - 0.45 * h) ** 2 / (0.22 * h) ** 2 + (xs - 0.6 * w) ** 2 / (0.15 * w) ** 2) < 1
    region |= (xs > 0.2 * w) & (xs < 0.3 * w) & (ys > 0.1 * h) & (ys < 0.8 * h)
    rgb[region] = (255, 0, 0)
    labels[region] = 7
    image = image_transform(112)(Image.fromarray(rgb))
    crop = segment.crop_truth(labels, 112)
    assert crop.shape == (112, 112) and set(np.unique(crop)) == {0, 1}
    red = (image[0] > 0.5).numpy()
    off = red != (crop == 1)
    assert off.mean() < 0.01, off.mean()
    edge = np.zeros_like(off)  # every disagreement is within a pixel of the region's edge
    for dy, dx in ((0, 1), (1, 0), (0, -1), (-1, 0)):
        edge |= (crop != np.roll(crop, (dy, dx), (0, 1)))
    assert not (off & ~edge).any()
    # the geometry is the image's: one pixel off would already break it
    shifted = np.roll(crop, 2, 1) == 1
    assert (red != shifted).mean() > 2 * off.mean()


def test_nesting_of_islands_across_levels():
    rng = np.random.default_rng(0)
    lower = rng.integers(0, 8, (16, 16))
    nested = segment.nesting(lower, lower // 2)  # each lower island inside one upper island
    assert nested["h_upper_given_lower"] == pytest.approx(0, abs=1e-12) and nested["share"] == 1.0
    crossing = segment.nesting(lower, rng.integers(0, 4, (16, 16)))
    assert crossing["h_upper_given_lower"] > 0.5 and crossing["share"] < 0.7
    assert crossing["h_upper_given_lower"] <= crossing["h_upper"] + 1e-12
    # by hand: lower [0 0 1 1], upper [0 1 1 1]: island 0 splits 1:1 (H = ln 2, majority 1 of 2),
    # island 1 lies inside upper 1; H(upper | lower) = 1/2 ln 2, share (1 + 2) / 4 = 3/4
    hand = segment.nesting(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]))
    assert hand["h_upper_given_lower"] == pytest.approx(0.5 * math.log(2))
    assert hand["share"] == 0.75 and hand["share_chance"] == 0.75


def test_random_partitions_and_colour_islands_are_whole_maps():
    maps = segment.random_maps((16, 16), [2, 5], seed=3)
    assert [len(np.unique(m)) for m in maps.values()] == [2, 5]
    assert np.array_equal(maps[5], segment.random_maps((16, 16), [5], seed=3)[5])
    img = torch.zeros(3, 32, 32)
    img[0, :, 16:] = 1
    colour = segment.kmeans_maps(segment.patch_colours(img, 8), [2])[2]
    assert np.array_equal(colour[:, :2] == colour[0, 0], np.ones((4, 2), bool)) and colour[0, 0] != colour[0, 3]


def thresholded(name: str, levels: int) -> np.ndarray:
    """A label map of a photograph at its own size: its grey level cut into ``levels`` bands."""
    grey = np.asarray(skimage_photo(name).convert("L"), dtype=np.float64)
    return np.digitize(grey, np.quantile(grey, np.linspace(0, 1, levels + 1)[1:-1]))


def test_segment_command_end_to_end(tmp_path, capsys):
    root = tmp_path / "run"
    assert main(["fit", "-c", str(CONFIGS / "apm.yaml"), "-c", str(CONFIGS / "smoke.yaml"),
                 "--data.images", "skimage:astronaut,coffee", "--data.val_fraction", "0",
                 "--data.image_size", "112", "--trainer.max_steps", "10",
                 "--trainer.default_root_dir", str(root), "--trainer.logger", "false",
                 "--trainer.callbacks", "lightning.pytorch.callbacks.ModelCheckpoint",
                 "--trainer.callbacks.save_last", "true", "--trainer.callbacks.save_top_k", "0",
                 "--trainer.enable_progress_bar", "false"]) == 0
    gt = tmp_path / "gt"
    gt.mkdir()
    bsds_mat(gt / "astronaut.mat", [thresholded("astronaut", 3), thresholded("astronaut", 5)])
    (gt / "coffee").mkdir()
    Image.fromarray(thresholded("coffee", 4).astype(np.uint8)).save(gt / "coffee" / "a.png")
    (gt / "chelsea.mat").write_bytes(b"not a mat file")
    out = tmp_path / "segment.json"
    capsys.readouterr()
    with pytest.warns(UserWarning) as caught:
        assert main(["segment", "--ckpt", str(root / "checkpoints" / "last.ckpt"),
                     "--images", "skimage:astronaut,coffee,chelsea", "--gt", str(gt), "--k", "2", "4",
                     "--perceive", "--max-steps", "5", "--upsample", "2", "--tree-k", "4", "2", "--n-init", "1",
                     "--figures", str(tmp_path / "fig"), "--json", str(out), "--device", "cpu"]) == 0
    said = " ".join(str(w.message) for w in caught)
    assert "chelsea.mat" in said and "1 input(s) skipped" in said
    printed = capsys.readouterr().out
    for text in ("level block1", "level block3", "teacher", "student", "fitted", "colour", "random",
                 "any resolution: level block3", "teacher_bilinear", "fitted_queried", "block2>block3",
                 "2 image(s) scored, 1 skipped"):
        assert text in printed, text
    doc = json.loads(out.read_text())
    assert doc["images"] == ["astronaut", "coffee"] and len(doc["skipped"]) == 1
    assert set(doc["levels"]) == {"block1", "block2", "block3"}
    assert set(doc["levels"]["block2"]) == {"teacher", "student", "fitted"}
    for v in [*doc["levels"]["block2"].values(), *doc["baselines"].values(), *doc["fine"]["block3"].values()]:
        assert set(v) == set(segment.MEASURES) and v["covering"]["ods_k"] in (2, 4)
        assert 0 < v["covering"]["ods"] <= v["covering"]["ois"] <= 1 and v["vi"]["ois"] <= v["vi"]["ods"]
    assert set(doc["nesting"]) == {"teacher", "student", "fitted"}
    assert set(doc["nesting"]["teacher"]) == {"block1>block2", "block2>block3", "block1>block1", "block2>block2",
                                              "block3>block3"}
    assert doc["fit"]["images"] == 2 and doc["fit"]["r2_mean_after"] > doc["fit"]["r2_mean_before"]
    # the ground truth is the photographs' grey levels: islands of patch colours find it, random
    # partitions do not
    assert doc["baselines"]["colour"]["covering"]["ods"] > doc["baselines"]["random"]["covering"]["ods"] + 0.05
    assert all(p.endswith(".png") for p in doc["figures"]) and len(doc["figures"]) == 3
