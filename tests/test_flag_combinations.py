"""The --ridge help says what the code computes."""

from pathlib import Path

import torch
from sklearn.linear_model import Ridge

from apm.commands.perceive import build_parser
from apm.perceive import ridge_readout


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
