"""The task interface every method implements, so one training loop serves all of them."""

from __future__ import annotations

import torch
from torch import nn


class Task(nn.Module):
    """A model plus its losses. ``forward`` is ``training_forward`` so a DeepSpeed engine (which
    calls ``forward``) drives it. The loop sums every loss whose key ends in ``_loss``."""

    #: batch columns the task reads; the loop moves them to the device
    batch_keys: tuple[str, ...] = ("image", "text")

    def training_forward(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        raise NotImplementedError

    def forward(self, batch: dict[str, torch.Tensor]):  # noqa: D102
        return self.training_forward(batch)

    def sync_batchnorm(self) -> Task:
        """The task with its BatchNorms synchronised across workers (multi-GPU runs): all of
        them by default; a task may keep some per-worker, as its reference does."""
        return nn.SyncBatchNorm.convert_sync_batchnorm(self)

    def param_groups(self, weight_decay: float, decay_logit_scales: bool = False) -> list[dict]:
        """AdamW groups: no decay on 1-d parameters (norms, biases, scales, embeddings' gains).
        ``decay_logit_scales`` decays the logit scales as GroupViT/PGSeg do (their 0-d scales miss
        the ``len(shape) == 1`` test of ``utils/optimizer.py``; ours are 1-element, for
        DeepSpeed)."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            scale = decay_logit_scales and name.endswith("logit_scale")
            (no_decay if p.ndim <= 1 and not scale else decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    @torch.no_grad()
    def after_step(self) -> None:
        """Hook after each optimizer step (EMA buffers, clamps)."""
