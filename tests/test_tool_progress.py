"""Long tools are not silent: apm islands names the image it draws, apm eval counts its images,
apm perceive says which image it fits before it starts."""

from pathlib import Path

from apm.cli import main

TINY_CKPT = str(Path(__file__).parent / "data" / "single_dinov2_tiny.ckpt")


def test_islands_bar_names_each_image(tmp_path, capsys):
    assert main(["islands", "--ckpt", TINY_CKPT, "--images", "skimage:astronaut,coffee", "--out", str(tmp_path),
                 "--method", "pca", "--display", "32"]) == 0
    err = capsys.readouterr().err
    assert "islands:" in err and "/2 [" in err  # a bar over the 2 images
    assert "astronaut" in err and "coffee" in err  # each named while it is drawn


def test_eval_counts_its_images(tmp_path, capsys):
    assert main(["eval", "--ckpt", TINY_CKPT, "--images", "skimage:astronaut,coffee,chelsea",
                 "--json", str(tmp_path / "e.json"), "--batch-size", "2"]) == 0
    err = capsys.readouterr().err
    assert "eval:" in err and "3/3 [" in err


def test_perceive_names_the_image_before_fitting(tmp_path, capsys):
    assert main(["perceive", "--ckpt", TINY_CKPT, "--images", "skimage:astronaut,coffee", "--out", str(tmp_path),
                 "--max-steps", "2", "--figures", "none"]) == 0
    out = capsys.readouterr().out.splitlines()
    first = [i for i, l in enumerate(out) if l.startswith("fitting astronaut (1 of 2)")]
    done = [i for i, l in enumerate(out) if l.startswith("astronaut: mean R^2")]
    assert first and done and first[0] < done[0], out
    assert any(l.startswith("fitting coffee (2 of 2)") for l in out)
