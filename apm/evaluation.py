"""What a trained student answers and how close it is: the ``Evaluation`` part of ``APMModule``
(dense features and queries decoded to the teacher's scale, the fidelity measures, the
validation step)."""

from __future__ import annotations

from typing import Sequence

import torch

from apm import metrics
from apm.data import batch_images
from teachers.base import select_levels


class Evaluation:
    """Mixed into ``APMModule``: uses its ``student``, ``standardizer``, ``levels``, ``targets``,
    ``loss_weights`` and Lightning's ``log``."""

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor, levels: Sequence[int] | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """Per level: cosine, centred cosine, R^2 (teacher's scale) and MSE (standardized), each (B,)."""
        levels = select_levels(self.levels, levels)
        feats = self.targets(images)
        return self.fidelity([feats[i] for i in levels], self.predict_features(images, levels), levels)

    def fidelity(self, teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor],
                 levels: Sequence[int]) -> dict[str, dict[str, torch.Tensor]]:
        """``evaluate``'s measures from features already computed: teacher and student (B, h, w, d)
        on the teacher's scale, one of each per entry of ``levels``."""
        out = {}
        for i, t, p in zip(levels, teacher, student):
            out[self.levels[i].name] = {
                "cos": metrics.cosine(p, t),
                "cos_centered": metrics.centered_cosine(p, t),
                "r2": metrics.r2(p, t),
                "mse": metrics.mse(self.standardizer.encode(i, p), self.standardizer.encode(i, t)),
            }
        return out

    def validation_step(self, batch: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                        batch_idx: int) -> None:
        images = batch_images(batch)[0]
        res = self.evaluate(images)
        n = images.shape[0]
        # sync_dist: under DDP every rank validates a shard; the epoch means cover all of them
        # (and every rank's ModelCheckpoint sees the same val/loss).
        for name, m in res.items():
            self.log_dict({f"val/{k}_{name}": v.mean() for k, v in m.items()}, batch_size=n, sync_dist=True)
        for k in ("cos", "r2", "mse"):
            self.log(f"val/{k}_mean", torch.stack([m[k].mean() for m in res.values()]).mean(),
                     batch_size=n, sync_dist=True)
        w = torch.tensor(self.loss_weights, device=images.device)
        loss = (torch.stack([m["mse"].mean() for m in res.values()]) * w).sum() / w.sum()
        self.log("val/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)

    # -- inference -------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_features(self, images: torch.Tensor, levels: Sequence[int] | None = None,
                         chunk: int | None = None) -> list[torch.Tensor]:
        """The student's dense features on the teacher's scale, per level (B, h, w, d)."""
        levels = select_levels(self.levels, levels)
        preds = self.student.dense(images, levels, chunk)
        return [self.standardizer.decode(i, p.float()) for i, p in zip(levels, preds)]

    @torch.no_grad()
    def query_features(self, level: int, coords: torch.Tensor, images: torch.Tensor | None = None,
                       trigger: torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
        """Query the student and decode to the teacher's scale: one level at coordinates (N, 2) in
        [0, 1], (B, N, d), for ``images`` (B, 3, H, W), or for trigger columns (B, ...) given
        instead (``apm interpolate`` mixes two images'); ``chunk`` queries per pass."""
        st = self.student
        if trigger is None:
            pred = st.query(images, level, coords, chunk)
        else:
            col = st.column_term(trigger)
            pred = torch.cat([st.answer(col, level, st.position_term(c))
                              for c in coords.split(chunk or len(coords))], dim=1)
        return self.standardizer.decode(level, pred.float())

    def predict_step(self, batch: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                     batch_idx: int) -> list[torch.Tensor]:
        return self.predict_features(batch_images(batch)[0])
