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

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: no decay on 1-d parameters (norms, biases, scales, embeddings' gains)."""
        decay, no_decay = [], []
        for _name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 else decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    @torch.no_grad()
    def after_step(self) -> None:
        """Hook after each optimizer step (EMA buffers, clamps)."""
