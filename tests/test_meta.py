"""The meta-learning mode (first-order Reptile) checked against an independent computation."""

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader, TensorDataset

from apm.data import load_images
from apm.module import APMModule
from tests.test_perceive import smoke_fit

TINY = dict(teacher="dinov2_tiny", teacher_args={"pretrained": False}, image_size=112, hidden_dims=[64, 64],
            pe_dim=32, level_dim=8, warmup_steps=0, stats_images=2)


def _trainer(precision: str) -> L.Trainer:
    """One step on the CPU at ``precision``; 16-mixed gets a CPU GradScaler, as on a GPU."""
    plugins = []
    if precision == "16-mixed":
        plugins = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]
    return L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, plugins=plugins,
                     **({} if plugins else {"precision": precision}))


# 16-mixed: the meta gradient is set by hand and Lightning's step unscales it by the loss scale
# (65536), and the inner loop's backward has no scaling: both must be handled, or this fails.
@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_reptile_step_matches_an_independent_computation(precision):
    images = torch.stack([img for _, img in load_images(["skimage:astronaut,coffee"], 112)])
    torch.manual_seed(0)
    module = APMModule(**TINY, queries_per_image=0, meta_inner_steps=2, meta_inner_lr=1e-2, lr=0.05)
    start = copy.deepcopy(module.student)
    loader = DataLoader(TensorDataset(images, torch.arange(2)), batch_size=2)
    _trainer(precision).fit(module, loader)

    # by hand, in fp32: each image's copy takes 2 AdamW steps on its own standardized MSE (every
    # query), then one AdamW step (fresh state, lr 0.05) on (start - mean of the copies)
    sd = module.standardizer
    targets = module.targets(images)
    copies = []
    for b in range(2):
        s = copy.deepcopy(start)
        opt = torch.optim.AdamW(s.parameters(), lr=1e-2, weight_decay=0.0)
        for _ in range(2):
            preds = s(images[b : b + 1], [None] * len(module.levels))
            loss = sum(F.mse_loss(p, sd.encode(i, rearrange(t[b : b + 1], "b h w d -> b (h w) d")))
                       for i, (p, t) in enumerate(zip(preds, targets))) / len(module.levels)
            opt.zero_grad()
            loss.backward()
            opt.step()
        copies.append(dict(s.named_parameters()))
    want = copy.deepcopy(start)
    outer = torch.optim.AdamW(want.parameters(), lr=0.05, weight_decay=0.0)
    pseudo = {}
    for n, p in want.named_parameters():
        p.grad = pseudo[n] = p.detach() - torch.stack([c[n].detach() for c in copies]).mean(0)
    outer.step()
    got = dict(module.student.named_parameters())
    compared = total = 0
    for n, p in want.named_parameters():
        # Adam's first step moves each weight by about lr = 0.05 in the sign of its pseudo-gradient.
        # Where that gradient is at the level of rounding noise (the vmapped path against this
        # plain one, and other CPUs' kernels), its sign is arbitrary: those weights are not compared.
        g = pseudo[n].abs()
        clear = g > 1e-4 * g.max()
        off = ((got[n] - p).abs() > 1e-3)[clear].float().mean().item()
        assert off < 0.002, (n, off)
        compared, total = compared + int(clear.sum()), total + g.numel()
    assert compared > 0.9 * total, (compared, total)  # nearly every weight was compared
    # and it moved: a step that kept the start would pass the comparison above only by accident
    assert not torch.allclose(got["first.weight"], start.first.weight)


def test_meta_mode_trains_through_the_cli_and_resumes(tmp_path):
    ckpt = smoke_fit(tmp_path, 4, "--model.meta_inner_steps", "2")
    saved = torch.load(ckpt, weights_only=True)
    assert saved["global_step"] == 4 and saved["optimizer_states"][0]["state"]
    smoke_fit(tmp_path, 6, "--model.meta_inner_steps", "2", "--ckpt_path", "last")
    resumed = torch.load(ckpt, weights_only=True)
    assert resumed["global_step"] == 6
    # the outer AdamW went on from its saved state (6 steps), not from a fresh one (2)
    assert all(float(s["step"]) == 6 for s in resumed["optimizer_states"][0]["state"].values())
    assert not torch.equal(resumed["state_dict"]["student.first.weight"], saved["state_dict"]["student.first.weight"])


def test_a_non_finite_meta_step_names_settings_that_apply_to_it():
    """Meta mode optimizes by hand, where Lightning refuses gradient_clip_val: the message must
    not suggest it."""
    from apm.errors import NonFiniteLossError

    module = APMModule(**TINY, meta_inner_steps=2, max_nonfinite_steps=1)
    with pytest.raises(NonFiniteLossError) as e:
        module.loss_is_finite(torch.tensor(float("nan")))
    assert "gradient_clip_val" not in str(e.value) and "model.meta_inner_lr" in str(e.value)
    plain = APMModule(**TINY, max_nonfinite_steps=1)
    with pytest.raises(NonFiniteLossError, match="gradient_clip_val"):
        plain.loss_is_finite(torch.tensor(float("inf")))
