"""Flags that would do nothing in a combination are an error or a one-line note, and the --ridge
help says what the code computes."""

import json
from pathlib import Path

import pytest
import torch
from sklearn.linear_model import Ridge

from apm.cli import main
from apm.commands.perceive import build_parser
from apm.perceive import ridge_readout
from tests.conftest import CONFIGS

TINY_CKPT = str(Path(__file__).parent / "data" / "single_dinov2_tiny.ckpt")


def _error(capsys, *argv: str) -> str:
    capsys.readouterr()
    assert main(list(argv)) == 2
    return capsys.readouterr().err


def test_ridge_without_solve_heads_is_an_error_and_nothing_is_recorded(tmp_path, capsys):
    err = _error(capsys, "perceive", "--ckpt", TINY_CKPT, "--images", "skimage:astronaut",
                 "--out", str(tmp_path / "p"), "--ridge", "0.5")
    assert "'--ridge 0.5'" in err and "--solve-heads" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p" / "perceive.jsonl").exists()


def test_a_route_the_solve_made_idle_gets_a_one_line_note(tmp_path, capsys):
    out = tmp_path / "p"
    capsys.readouterr()
    assert main(["perceive", "--ckpt", TINY_CKPT, "--images", "skimage:astronaut", "--out", str(out),
                 "--solve-heads", "--moves", "body", "--resolve-every", "1", "--figures", "none"]) == 0
    printed = capsys.readouterr().out
    (line,) = [json.loads(x) for x in (out / "perceive.jsonl").read_text().splitlines()]
    assert line["steps"] == 1 and line["reached"]  # the solve met the default target at step 1
    notes = [l for l in printed.splitlines() if l.startswith("note:")]
    assert len(notes) == 1 and "--moves body and --resolve-every 1 did nothing" in notes[0], printed
    # a target the solve does not meet: the gradient steps run and no note is printed
    capsys.readouterr()
    assert main(["perceive", "--ckpt", TINY_CKPT, "--images", "skimage:astronaut", "--out", str(tmp_path / "q"),
                 "--solve-heads", "--moves", "body", "--resolve-every", "1", "--figures", "none",
                 "--target-r2", "1.1", "--max-steps", "3", "--eval-every", "1"]) == 0
    assert "note:" not in capsys.readouterr().out


def test_islands_k_without_a_student_is_an_error(tmp_path, capsys):
    err = _error(capsys, "islands", "--config", str(CONFIGS / "apm.yaml"), "--config", str(CONFIGS / "smoke.yaml"),
                 "--images", "skimage:astronaut", "--out", str(tmp_path), "--k", "5")
    assert "'--k'" in err and "--ckpt" in err
    assert not list(tmp_path.glob("*.png"))


def test_ridge_help_states_the_penalty_the_code_uses():
    """lam = ridge x the mean squared norm of the centred rows, checked against scikit-learn's Ridge,
    and the help says so (it said 'the mean squared activation': 256x smaller at width 256)."""
    g = torch.Generator().manual_seed(0)
    h, z = torch.randn(40, 16, generator=g, dtype=torch.float64), torch.randn(40, 3, generator=g, dtype=torch.float64)
    weight, bias = ridge_readout(h, z, 0.05)
    hc = h - h.mean(0)
    lam = 0.05 * float((hc**2).sum(1).mean())  # norm of the rows: a sum over the 16 units
    ref = Ridge(alpha=lam, solver="cholesky").fit(h.numpy(), z.numpy())
    torch.testing.assert_close(weight, torch.from_numpy(ref.coef_), rtol=1e-8, atol=1e-10)
    help_text = " ".join(next(a for a in build_parser()._actions if "--ridge" in a.option_strings).help.split())
    assert "mean squared norm of the centred activation rows" in help_text
    doc = " ".join((Path(__file__).parents[1] / "docs" / "perceive.md").read_text().split())
    assert "`--ridge` times the mean squared centred" not in doc and "mean squared norm of the centred" in doc
