"""Meta-learning the student's weights as a starting point for fitting new images: first-order
Reptile (``model.meta_inner_steps``), run by ``APMModule`` with manual optimization."""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch


def _without_fp16_autocast(device_type: str):
    """Reptile's inner loop runs its own backward, with no loss scaling: fp16 autocast (16-mixed)
    is turned off there (fp32; gradients would underflow), bf16 autocast is kept."""
    fp16 = torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.float16
    return torch.autocast(device_type, enabled=False) if fp16 else contextlib.nullcontext()


def reptile_step(module, images: torch.Tensor, feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """One Reptile step of ``module`` (an APMModule in meta mode, inside its training step): fit a
    copy of the student to each image for ``meta_inner_steps`` steps, then update the shared
    weights with (weights - mean of the fitted copies) as the gradient. Logs the inner loss before
    (``train/loss``) and after (``train/loss_adapted``)."""
    from apm.perceive import Adaptation

    hp = module.hparams
    theta = dict(module.student.named_parameters())
    copies = {n: p.detach().expand(len(images), *p.shape).clone().requires_grad_() for n, p in theta.items()}
    z = [module.standardizer.encode(i, f) for i, f in enumerate(feats)]
    fit = Adaptation(module.student, images, z, module.loss_weights, hp.queries_per_image)
    inner = torch.optim.AdamW(list(copies.values()), lr=hp.meta_inner_lr, weight_decay=hp.weight_decay)
    with torch.enable_grad(), _without_fp16_autocast(images.device.type):
        losses = [fit.step(copies, inner).mean() for _ in range(hp.meta_inner_steps)]
    opt = module.optimizers()
    opt.zero_grad()
    finite = module.loss_is_finite(torch.stack(losses)) and all(
        bool(torch.isfinite(c).all()) for c in copies.values())
    if finite:  # under DDP each rank averages its own copies; Lightning does not sync manual grads
        # Under 16-mixed, Lightning's optimizer step unscales every gradient by the loss scale:
        # the hand-set one is scaled first, or the meta update would shrink 65536-fold.
        scaler = getattr(module.trainer.precision_plugin, "scaler", None)
        for n, p in theta.items():
            grad = p.detach() - copies[n].detach().mean(0)
            if module.trainer.world_size > 1:
                grad = module.trainer.strategy.reduce(grad, reduce_op="mean")
            p.grad = grad if scaler is None else scaler.scale(grad)
        opt.step()
        module.lr_schedulers().step()
        module.log_dict({"train/loss": losses[0], "train/loss_adapted": losses[-1]}, prog_bar=True)
    module.log("train/nonfinite_steps", float(module.nonfinite_total))
    return losses[0]

