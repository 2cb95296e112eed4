"""The meta-learning mode (first-order Reptile) checked against an independent computation."""

import copy

import lightning as L
import torch
import torch.nn.functional as F
from einops import rearrange
from torch.utils.data import DataLoader, TensorDataset

from apm.analysis import load_images
from apm.module import APMModule
from tests.test_perceive import smoke_fit

TINY = dict(teacher="dinov2_tiny", teacher_args={"pretrained": False}, image_size=112, hidden_dims=[64, 64],
            pe_dim=32, level_dim=8, warmup_steps=0, stats_images=2)


def test_reptile_step_matches_an_independent_computation():
    images = torch.stack([img for _, img in load_images(["skimage:astronaut,coffee"], 112)])
    torch.manual_seed(0)
    module = APMModule(**TINY, queries_per_image=0, meta_inner_steps=2, meta_inner_lr=1e-2, lr=0.05)
    start = copy.deepcopy(module.student)
    loader = DataLoader(TensorDataset(images, torch.arange(2)), batch_size=2)
    L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(module, loader)

    # by hand: each image's copy takes 2 AdamW steps on its own standardized MSE (every query),
    # then one AdamW step (fresh state, lr 0.05) on (start - mean of the copies)
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
    for n, p in want.named_parameters():
        p.grad = p.detach() - torch.stack([c[n].detach() for c in copies]).mean(0)
    outer.step()
    got = dict(module.student.named_parameters())
    for n, p in want.named_parameters():
        # Adam moves each weight by about lr = 0.05 in the sign of its pseudo-gradient; weights
        # whose gradients are ~1e-9 (noise between the vmapped and the plain path) may flip
        off = ((got[n] - p).abs() > 1e-3).float().mean().item()
        assert off < 0.01, (n, off)
    # and it moved: a step that kept the start would pass the comparison above only by accident
    assert not torch.allclose(got["first.weight"], start.first.weight)


def test_meta_mode_trains_through_the_cli_and_resumes(tmp_path):
    ckpt = smoke_fit(tmp_path, 4, "--model.meta_inner_steps", "2")
    saved = torch.load(ckpt, weights_only=True)
    assert saved["global_step"] == 4 and saved["optimizer_states"][0]["state"]
    smoke_fit(tmp_path, 6, "--model.meta_inner_steps", "2", "--ckpt_path", "last")
    resumed = torch.load(ckpt, weights_only=True)
    assert resumed["global_step"] == 6
    assert not torch.equal(resumed["state_dict"]["student.first.weight"], saved["state_dict"]["student.first.weight"])
