"""apm explore: the page's data against an independent computation (k-means of the teacher's and
the student's features, the region measures on pixel maps), and the page itself in a real
headless Chromium: a click highlights exactly the clicked pixel's island at every level, for
every source and annotator; k and the photograph change them; no request leaves the page; bad
input is one error before any work. Tiny random-weight teacher, scikit-image photographs."""

import io
import json
import re

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from apm.cli import main
from apm.data import image_transform, skimage_photo
from apm.explore import rle_decode, rle_encode
from apm.explore.maps import match_labels
from apm.cli import load_student
from apm.segment import region_scores
from tests.conftest import CONFIGS

SIZE, KS = 112, [2, 3, 5]


def page_data(path) -> dict:
    """The JSON block of a page, read as a browser would (no code of ours)."""
    html = path.read_text(encoding="utf-8")
    return json.loads(re.search(r'<script id="apm-data" type="application/json">(.*?)</script>', html, re.S)[1])


def bands(name: str, n: int) -> np.ndarray:
    """A label map of a photograph at its own size: its grey level cut into ``n`` bands."""
    grey = np.asarray(skimage_photo(name).convert("L"), dtype=np.float64)
    return np.digitize(grey, np.quantile(grey, np.linspace(0, 1, n + 1)[1:-1]))


def pixel_map(cells: np.ndarray) -> np.ndarray:
    """A grid's labels at every pixel (the grid divides the photograph exactly here)."""
    rows, cols = SIZE // cells.shape[0], SIZE // cells.shape[1]
    assert rows * cells.shape[0] == SIZE and cols * cells.shape[1] == SIZE
    return np.repeat(np.repeat(cells, rows, 0), cols, 1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 5-step student of the tiny teacher, ground truth for one photograph (BSDS .mat, two
    annotators), and the page of two photographs with the student fitted to each."""
    tmp = tmp_path_factory.mktemp("explore")
    assert main(["fit", "-c", str(CONFIGS / "apm.yaml"), "-c", str(CONFIGS / "smoke.yaml"),
                 "--data.images", "skimage:astronaut,coffee", "--data.val_fraction", "0",
                 "--data.image_size", str(SIZE), "--trainer.max_steps", "5",
                 "--trainer.default_root_dir", str(tmp / "run"), "--trainer.logger", "false",
                 "--trainer.callbacks", "lightning.pytorch.callbacks.ModelCheckpoint",
                 "--trainer.callbacks.save_last", "true", "--trainer.callbacks.save_top_k", "0",
                 "--trainer.enable_progress_bar", "false"]) == 0
    gt = tmp / "gt"
    gt.mkdir()
    cell = np.empty((1, 2), dtype=object)
    for i, m in enumerate([bands("astronaut", 3), bands("astronaut", 5)]):
        struct = np.empty((1, 1), dtype=[("Segmentation", object), ("Boundaries", object)])
        struct[0, 0] = (m.astype(np.uint16) + 1, np.zeros_like(m, dtype=np.uint8))
        cell[0, i] = struct
    scipy.io.savemat(str(gt / "astronaut.mat"), {"groundTruth": cell})
    ckpt, page = tmp / "run" / "checkpoints" / "last.ckpt", tmp / "page.html"
    assert main(["explore", "--ckpt", str(ckpt), "--images", "skimage:astronaut,coffee", "--gt", str(gt),
                 "--k", *map(str, KS), "--perceive", "--max-steps", "3", "--n-init", "2", "--device", "cpu",
                 "--out", str(page)]) == 0
    return {"ckpt": ckpt, "page": page, "gt": gt, "data": page_data(page)}


def test_run_length_arrays():
    m = np.array([[0, 0, 1], [1, 1, 2]])
    assert rle_encode(m) == [0, 2, 1, 3, 2, 1]  # runs go on across rows
    rng = np.random.default_rng(0)
    for shape in ((1, 1), (7, 5), (16, 16)):
        labels = rng.integers(0, 3, shape)
        assert np.array_equal(rle_decode(rle_encode(labels), shape), labels)
    with pytest.raises(ValueError, match="6 cells for a 2x2 map"):
        rle_decode([0, 6], (2, 2))


def test_names_with_html_in_them_stay_data(tmp_path):
    from apm.explore import write_page

    path = write_page({"title": "a <b> & c", "photos": [{"name": "</script><!--x"}]}, tmp_path / "p.html")
    assert page_data(path)["photos"][0]["name"] == "</script><!--x"
    assert "<title>a &lt;b> &amp; c</title>" in path.read_text()


def test_student_islands_take_the_names_of_the_teacher_islands_they_match():
    rng = np.random.default_rng(1)
    teacher = rng.integers(0, 4, (8, 8))
    renamed = match_labels(np.array([3, 0, 2, 1])[teacher], teacher)
    assert np.array_equal(renamed, teacher)
    other = rng.integers(0, 6, (8, 8))  # more islands than the teacher: the extra ones get new names
    got = match_labels(other, teacher)
    assert adjusted_rand_score(other.ravel(), got.ravel()) == 1.0 and len(np.unique(got)) == 6


def test_page_holds_the_islands_of_teacher_and_student(run):
    data = run["data"]
    assert data["format"] == "apm-explore/1" and data["size"] == SIZE and data["ks"] == KS and data["k"] == 3
    assert data["levels"] == ["block1", "block2", "block3"] and data["sources"] == ["teacher", "student", "fitted"]
    assert [p["name"] for p in data["photos"]] == ["astronaut", "coffee"]
    module = load_student(run["ckpt"])
    image = image_transform(SIZE)(skimage_photo("astronaut"))[None]
    with torch.no_grad():
        teacher = module.targets(image)
        student = module.predict_features(image)
    photo = data["photos"][0]
    for i, level in enumerate(data["levels"]):
        grid = tuple(photo["grids"]["teacher"][level])
        assert photo["grids"]["student"][level] == photo["grids"]["fitted"][level] == list(grid)
        assert grid == tuple(teacher[i].shape[1:3]) == (8, 8)
        for source, feats in (("teacher", teacher[i]), ("student", student[i])):
            for k in KS:
                ours = rle_decode(photo["maps"][source][level][str(k)], grid)
                pts = feats[0].reshape(-1, feats.shape[-1]).numpy().astype(np.float32)
                theirs = KMeans(k, n_init=2, random_state=0).fit_predict(pts)
                assert len(np.unique(ours)) == k
                assert adjusted_rand_score(theirs, ours.ravel()) == pytest.approx(1.0), (source, level, k)
        t, s = (rle_decode(photo["maps"][src][level]["5"], grid) for src in ("teacher", "student"))
        assert photo["ari"][level]["5"]["student"] == pytest.approx(adjusted_rand_score(t.ravel(), s.ravel()), abs=1e-4)
    assert photo["fit"]["steps"] <= 3 and data["photos"][1]["gt"] is None


def test_page_scores_against_people_are_those_of_the_pixel_maps(run):
    photo = run["data"]["photos"][0]
    people = [rle_decode(m, (SIZE, SIZE)) for m in photo["gt"]["maps"]]
    assert [len(np.unique(m)) for m in people] == [3, 5]
    # the bands of the photograph as the student sees it: the cropped maps follow the image
    grey = image_transform(SIZE)(skimage_photo("astronaut")).mean(0).numpy()
    dark, light = grey[people[0] == 0].mean(), grey[people[0] == 2].mean()
    assert light > dark + 0.3
    for level in ("block1", "block3"):
        labels = rle_decode(photo["maps"]["fitted"][level]["5"], tuple(photo["grids"]["fitted"][level]))
        want = region_scores(pixel_map(labels), people)
        assert photo["gt"]["scores"]["fitted"][level]["5"] == pytest.approx(want, abs=2e-4)


def browser_or_skip():
    pytest.importorskip("playwright", reason="Playwright is not installed: pip install -e '.[test]'")
    from apm.explore import browser

    if browser.find_chromium() is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium; .ci/run installs it)")
    return browser


def check_highlights(page, browser, data, photo_index: int) -> dict:
    """Every level's, source's and annotator's highlight is exactly the island holding the chosen
    pixel (label maps decoded here); the island sizes shown are theirs. Returns the masks."""
    photo, k = data["photos"][photo_index], page.evaluate("window.apmExplore.state.k")
    x, y = page.evaluate("window.apmExplore.state.px")
    masks = {}
    for level in data["levels"]:
        for source in data["sources"]:
            grid = tuple(photo["grids"][source][level])
            labels = pixel_map(rle_decode(photo["maps"][source][level][str(k)], grid))
            want = labels == labels[y, x]
            got = browser.drawn_mask(page, f"hl-{source}-{level}")
            assert np.array_equal(got, want), (source, level, k, int((got != want).sum()))
            masks[source, level] = got
        size = f"{100 * masks['teacher', level].mean():.1f}%"
        assert f"teacher {size}" in page.inner_text(f"#stats-{level}")
    for a, m in enumerate(photo["gt"]["maps"] if photo["gt"] else []):
        people = rle_decode(m, (SIZE, SIZE))
        assert np.array_equal(browser.drawn_mask(page, f"hl-people-{a}"), people == people[y, x])
    return masks


def test_a_click_highlights_the_island_at_every_level_in_a_real_browser(run):
    browser = browser_or_skip()
    data = run["data"]
    with browser.open_page(run["page"]) as (page, requested):
        assert page.evaluate("window.apmExplore.state.px") is None
        assert not browser.drawn_mask(page, "hl-teacher-block3").any()
        browser.click_pixel(page, "hl-photo", 30, 70, SIZE)
        x, y = page.evaluate("window.apmExplore.state.px")
        assert abs(x - 30) <= 1 and abs(y - 70) <= 1  # the click lands on the pixel (to the screen's rounding)
        assert page.inner_text("#readout") == f"astronaut: pixel (x {x}, y {y}), k = 3"
        at3 = check_highlights(page, browser, data, 0)
        assert page.locator("#tree svg circle").count() == 3 * 3  # a node per level and source
        page.click("#kbuttons button[data-k='5']")
        at5 = check_highlights(page, browser, data, 0)
        assert any(not np.array_equal(at3[key], at5[key]) for key in at3)
        browser.click_pixel(page, "hl-student-block2", 100, 10, SIZE)  # any picture takes a click
        assert abs(page.evaluate("window.apmExplore.state.px[0]") - 100) <= 2
        check_highlights(page, browser, data, 0)
        before = browser.canvas_rgb(page, "base-teacher-block1")
        page.locator("#opacity").fill("0")
        after = browser.canvas_rgb(page, "base-teacher-block1")
        assert np.abs(before.astype(int) - after.astype(int)).mean() > 5
        page.select_option("#photo", "1")
        page.wait_for_function("window.apmExplore.state.photo === 1")
        assert page.locator("#people").is_hidden()
        check_highlights(page, browser, data, 1)
        shot = np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB"))
        assert shot.std() > 30 and len(np.unique(shot.reshape(-1, 3), axis=0)) > 1000
        assert requested == []  # no request left the page
        page.set_content("<img src='http://127.0.0.1:9/x.png'>")  # the recorder sees (and blocks) one
        page.wait_for_timeout(300)
        assert requested == ["http://127.0.0.1:9/x.png"]


def test_students_queried_between_the_cells(run, tmp_path):
    """--upsample 2: the student's islands come from its field queried at twice each level's grid,
    the teacher's stay on its grid; the page highlights both exactly."""
    from apm.segment import student_features

    page = tmp_path / "fine.html"
    assert main(["explore", "--ckpt", str(run["ckpt"]), "--images", "skimage:coffee", "--k", "2", "4",
                 "--upsample", "2", "--n-init", "2", "--device", "cpu", "--out", str(page)]) == 0
    data = page_data(page)
    photo = data["photos"][0]
    module = load_student(run["ckpt"])
    image = image_transform(SIZE)(skimage_photo("coffee"))
    for i, level in enumerate(data["levels"]):
        assert photo["grids"]["teacher"][level] == [8, 8] and photo["grids"]["student"][level] == [16, 16]
        ours = rle_decode(photo["maps"]["student"][level]["4"], (16, 16))
        feats = student_features(module, image, i, (16, 16)).reshape(256, -1).numpy().astype(np.float32)
        assert adjusted_rand_score(KMeans(4, n_init=2, random_state=0).fit_predict(feats), ours.ravel()) == 1.0
        teacher = np.kron(rle_decode(photo["maps"]["teacher"][level]["4"], (8, 8)), np.ones((2, 2), int))
        assert photo["ari"][level]["4"]["student"] == pytest.approx(
            adjusted_rand_score(teacher.ravel(), ours.ravel()), abs=1e-4)
    browser = browser_or_skip()
    with browser.open_page(page) as (pg, requested):
        browser.click_pixel(pg, "hl-photo", 60, 20, SIZE)
        check_highlights(pg, browser, data, 0)
        assert "8x8, 16x16 grid" in pg.inner_text("#levels")
        assert requested == []


@pytest.mark.parametrize("args, says", [
    (["--levels", "block9"], "Setting '--levels': level 'block9' is not a level of this teacher"),
    (["--k", "0", "3"], "Setting '--k' [0, 3]: cluster counts must be 1 or more"),
    (["--k", "2", "65"], "Setting '--k': k 65 is more islands than the 64 cells"),
    (["--k", "2", "4", "--initial-k", "3"], "Setting '--initial-k' 3: the page opens at one of the k"),
    (["--images", "skimage:nosuch"], "Setting '--images': ['nosuch'] are not embedded scikit-image photographs"),
    (["--images", "no/such.jpg"], "Setting '--images': 'no/such.jpg' does not exist"),
    (["--gt", "no/such/folder"], "Setting '--gt': 'no/such/folder' is not a folder of ground truth"),
    (["--upsample", "0"], "Setting '--upsample' 0: give 1"),
])
def test_bad_input_is_one_error_before_any_work(run, tmp_path, capsys, args, says):
    out = tmp_path / "page.html"
    base = {"--ckpt": str(run["ckpt"]), "--images": "skimage:astronaut", "--out": str(out), "--device": "cpu"}
    for flag in args:
        base.pop(flag, None)
    argv = ["explore", *[x for kv in base.items() for x in kv], *args]
    capsys.readouterr()
    assert main(argv) == 2
    said = capsys.readouterr()
    assert said.err.startswith("error: " + says) and said.err.count("\n") == 1, said.err
    assert "[1/1]" not in said.out and not out.exists()


def test_images_and_ground_truth_are_checked_before_the_student_loads(tmp_path, capsys):
    # the checkpoint does not exist either: the image is named first, so nothing was loaded
    assert main(["explore", "--ckpt", str(tmp_path / "none.ckpt"), "--images", "skimage:nosuch",
                 "--out", str(tmp_path / "p.html")]) == 2
    assert "'--images'" in capsys.readouterr().err
