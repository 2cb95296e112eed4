"""A real image collection has bad files: convertible ones are converted, unreadable ones are
skipped with one warning each and a count per epoch, and a run through the real CLI survives them."""

import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apm.data import APMDataModule, load_image, skimage_photo
from apm.errors import ConfigError, UnreadableImageError
from apm.skipping import SkipBadImages, SkippingDataLoader
from tests.conftest import CONFIGS


def _photo(name: str, w: int = 160) -> Image.Image:
    img = skimage_photo(name)
    return img.resize((w, round(w * img.height / img.width)))


def _png_header(w: int, h: int) -> bytes:
    """A tiny PNG file whose header claims w x h pixels (a decompression bomb's calling card)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(999)))
            + chunk(b"IEND", b""))


def make_collection(d: Path) -> tuple[dict[str, Image.Image], list[str]]:
    """Real photographs in several formats, every convertible kind, every unreadable kind.
    Returns {convertible file: the upright RGB it should load as} and the unreadable names."""
    d.mkdir(parents=True, exist_ok=True)
    good: dict[str, Image.Image] = {}
    for name, file in [("astronaut", "astronaut.jpg"), ("coffee", "coffee.png"),
                       ("chelsea", "chelsea.bmp"), ("rocket", "rocket.webp"), ("cat", "cat.tif")]:
        _photo(name).save(d / file)
        good[file] = _photo(name)
    p = _photo("coffee")
    p.convert("L").save(d / "gray.png")
    good["gray.png"] = p.convert("L").convert("RGB")
    rgba = p.copy()
    rgba.putalpha(Image.linear_gradient("L").resize(p.size))
    rgba.save(d / "rgba.png")
    good["rgba.png"] = Image.alpha_composite(Image.new("RGBA", p.size, "white"), rgba).convert("RGB")
    p.convert("P", palette=Image.Palette.ADAPTIVE).save(d / "palette.gif")
    good["palette.gif"] = p.convert("P", palette=Image.Palette.ADAPTIVE).convert("RGB")
    g16 = np.asarray(p.convert("L"), dtype=np.uint16) * 257
    Image.fromarray(g16).save(d / "gray16.png")
    assert Image.open(d / "gray16.png").mode.startswith("I;16")
    good["gray16.png"] = p.convert("L").convert("RGB")
    p.convert("CMYK").save(d / "cmyk.jpg", quality=95)
    good["cmyk.jpg"] = p
    Image.fromarray(np.asarray(p.convert("L"), dtype=np.float32) / 255).save(d / "float.tif")
    good["float.tif"] = None  # min-max scaled: checked for mode only
    p.convert("1").save(d / "bilevel.png")
    good["bilevel.png"] = p.convert("1").convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    p.transpose(Image.Transpose.ROTATE_90).save(d / "rotated.jpg", exif=exif, quality=95)
    good["rotated.jpg"] = p
    p.resize((20, 30)).save(d / "small_ok.png")  # above min_side: upscaled
    good["small_ok.png"] = p.resize((20, 30))
    p.resize((3000, 2250)).save(d / "big.jpg", quality=85)  # over the CLI test's max_pixels
    good["big.jpg"] = None

    jpg = (d / "astronaut.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    png = bytearray((d / "coffee.png").read_bytes())
    start = png.index(b"IDAT") + 40
    png[start:start + 400] = os.urandom(400)
    (d / "corrupt.png").write_bytes(bytes(png))
    (d / "notes.jpg").write_text("not an image, only named like one\n")
    (d / "empty.png").write_bytes(b"")
    p.resize((8, 8)).save(d / "tiny.png")  # below one patch
    (d / "bomb.png").write_bytes(_png_header(100_000, 100_000))
    (d / "README.txt").write_text("ignored: not an image extension\n")
    bad = ["truncated.jpg", "corrupt.png", "notes.jpg", "empty.png", "tiny.png", "bomb.png"]
    return good, bad


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    d = tmp_path_factory.mktemp("collection") / "images"
    return d, *make_collection(d)


def test_convertible_images_load_as_upright_rgb(collection):
    d, good, _ = collection
    for file, expected in good.items():
        img = load_image(d / file, min_side=14, max_pixels=10**7)
        assert img.mode == "RGB", file
        if expected is None:
            continue
        assert img.size == expected.size, file
        err = np.abs(np.asarray(img, float) - np.asarray(expected.convert("RGB"), float)).mean()
        assert err < 6, (file, err)  # JPEG and palette quantization only
    # The rotated file really is stored sideways: without the EXIF step it would not match.
    with Image.open(d / "rotated.jpg") as raw:
        assert raw.size == good["rotated.jpg"].size[::-1]


def test_unreadable_images_raise_one_clear_error_each(collection):
    d, _, bad = collection
    reasons = {}
    for file in bad:
        with pytest.raises(UnreadableImageError) as e:
            load_image(d / file, min_side=14)
        assert str(d / file) in str(e.value)
        reasons[file] = str(e.value)
    assert "data.min_side" in reasons["tiny.png"] and "data.max_pixels" in reasons["bomb.png"]
    assert load_image(d / "tiny.png", min_side=1).size == (8, 8)  # min_side 1: kept, upscaled later


def test_large_jpeg_decodes_at_reduced_scale(collection):
    d, _, _ = collection
    assert load_image(d / "big.jpg", size=56, max_pixels=2_000_000).size == (375, 282)  # 1/8 scale
    with pytest.raises(UnreadableImageError, match="data.max_pixels"):
        load_image(d / "big.jpg", max_pixels=2_000_000)  # full decode would be 6.75M pixels


def test_skipping_loader_keeps_batches_full_and_names_failures_once(collection, caplog):
    d, good, bad = collection
    dm = APMDataModule(str(d), image_size=56, batch_size=4, val_fraction=0, num_workers=2,
                       max_pixels=2_000_000)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, SkippingDataLoader) and isinstance(loader.dataset, SkipBadImages)
    with caplog.at_level("WARNING", logger="apm"):
        for _ in range(2):  # two epochs: each file warned once, counted every epoch
            sizes = [b[0].shape[0] for b in loader]
            assert sizes[:-1] == [4] * (len(sizes) - 1)
            assert sum(sizes) == len(good) + len(bad)  # replaced, not dropped
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped image")]
    assert sorted(Path(m.split()[2].rstrip(":")).name for m in skipped) == sorted(bad)
    counts = [m for m in caplog.messages if "unreadable image(s) of" in m]
    assert len(counts) == 2 and all(f"skipped {len(bad)} unreadable image(s) of {len(good) + len(bad)}" in m
                                    for m in counts), counts


def test_folder_without_usable_images_is_a_config_error(tmp_path):
    (tmp_path / "a.jpg").write_text("text")
    (tmp_path / "b.png").write_bytes(b"")
    _photo("coffee").resize((5, 5)).save(tmp_path / "c.png")
    dm = APMDataModule(str(tmp_path), image_size=56, val_fraction=0)
    with pytest.raises(ConfigError) as e:
        dm.setup("fit")
    msg = str(e.value)
    assert "'data.images'" in msg and "a.jpg" in msg and "none of the 3" in msg


@pytest.mark.slow
def test_island_figures_skip_an_unreadable_validation_image(tmp_path, caplog):
    import lightning as L

    from apm.callbacks import IslandFigures
    from apm.module import APMModule

    d = tmp_path / "images"
    d.mkdir()
    for i, name in enumerate(["astronaut", "coffee", "chelsea", "rocket", "cat"]):
        _photo(name).save(d / f"{i}.png")
    split = dict(image_size=56, batch_size=3, val_fraction=0.4, num_workers=0)
    probe = APMDataModule(str(d), **split)
    probe.setup("fit")
    bad = Path(probe.val_set.sources[0])  # the first validation image (2 of 5) becomes unreadable
    bad.write_text("not an image any more\n")

    module = APMModule(teacher="dinov2_tiny", teacher_args={"pretrained": False}, image_size=56,
                       hidden_dims=[32], pe_dim=16, level_dim=8, queries_per_image=32, stats_images=3)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=str(tmp_path), precision="32-true",
                        callbacks=[IslandFigures(num_images=1, method="pca", display=32)])
    with caplog.at_level("WARNING", logger="apm"):
        trainer.fit(module, APMDataModule(str(d), **split))
    assert trainer.global_step == 1
    assert [p.name for p in (tmp_path / "islands").glob("*.png")] == ["step000001-0.png"]
    assert any(f"skipped image {bad}" in m for m in caplog.messages)


@pytest.mark.slow
def test_cli_trains_through_a_collection_with_bad_files(tmp_path, collection):
    d, good, bad = collection
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "apm", "fit", "-c", str(CONFIGS / "apm.yaml"), "-c", str(CONFIGS / "smoke.yaml"),
           "--data.images", str(d), "--data.image_size", "56", "--data.batch_size", "4",
           "--data.val_fraction", "0", "--data.num_workers", "2", "--data.max_images", "100",
           "--data.max_pixels", "2000000", "--model.hidden_dims", "[64]", "--model.queries_per_image", "64",
           "--trainer.max_steps", "12", "--trainer.logger", "false", "--trainer.precision", "32-true",
           "--trainer.enable_progress_bar", "false"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    named = re.findall(r"skipped image (\S+): ", out.stderr)
    assert sorted(Path(n).name for n in named) == sorted(bad), out.stderr[-3000:]  # each once
    total = len(good) + len(bad)
    counts = re.findall(rf"training images, pass (\d+): skipped (\d+) unreadable image\(s\) of {total}",
                        out.stderr)
    assert len(counts) >= 2 and all(int(n) == len(bad) for _, n in counts), out.stderr[-3000:]
    assert f"{len(bad)} image file(s) were skipped as unreadable" in out.stderr
    ckpt = torch.load(tmp_path / "runs/smoke/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 12


def _bad_folder(d: Path) -> list[str]:
    """Two real photographs, a truncated JPEG and a text file named .jpg; returns the bad ones."""
    d.mkdir()
    _photo("astronaut").save(d / "astronaut.jpg")
    _photo("chelsea").save(d / "chelsea.jpg")
    whole = (d / "chelsea.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (d / "text.jpg").write_text("not an image\n")
    return [str(d / "text.jpg"), str(d / "truncated.jpg")]


TINY_CKPT = Path(__file__).parent / "data" / "single_dinov2_tiny.ckpt"


@pytest.mark.parametrize("tool", [
    ["islands", "--ckpt", str(TINY_CKPT), "--method", "pca", "--display", "32", "--out", "figs"],
    ["eval", "--ckpt", str(TINY_CKPT), "--json", "e.json"],
])
def test_tools_skip_bad_images_naming_each_once_with_a_count(tmp_path, monkeypatch, caplog, recwarn, tool):
    from apm.cli import main

    bad = _bad_folder(tmp_path / "imgs")
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("WARNING", logger="apm"):
        assert main([*tool, "--images", "imgs"]) == 0
    named = [m.split(": ")[0].removeprefix("skipped image ") for m in caplog.messages
             if m.startswith("skipped image ")]
    assert sorted(str(tmp_path / n) for n in named) == bad, caplog.messages  # each once, by name
    assert any("2 image file(s) were skipped as unreadable" in m and "2 image(s) loaded" in m
               for m in caplog.messages)
    # log lines, not Python warnings (which print the warning's source line)
    assert not [w for w in recwarn if "skipped" in str(w.message)]


def test_an_unreadable_validation_image_is_named(tmp_path, caplog):
    d = tmp_path / "images"
    d.mkdir()
    for i, name in enumerate(["astronaut", "coffee", "chelsea", "rocket"]):
        _photo(name).save(d / f"{i}.png")
    probe = APMDataModule(str(d), image_size=56, val_fraction=0.25)
    probe.setup("fit")
    bad = probe.val_set.sources[0]
    Path(bad).write_text("not an image any more\n")
    dm = APMDataModule(str(d), image_size=56, val_fraction=0.25)
    with caplog.at_level("WARNING", logger="apm"):
        dm.setup("fit")
    assert [m for m in caplog.messages if m.startswith(f"skipped image {bad}: ")]
    assert any("validating on the training images" in m for m in caplog.messages)


def test_one_unreadable_file_is_not_called_one_image(tmp_path, caplog):
    (tmp_path / "text.jpg").write_text("not an image\n")
    dm = APMDataModule(str(tmp_path), image_size=56, val_fraction=0.2)
    with caplog.at_level("WARNING"), pytest.raises(ConfigError, match="text.jpg"):
        dm.setup("fit")
    assert not any("Only one image" in m for m in caplog.messages)
