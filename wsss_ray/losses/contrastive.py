"""Image-text contrastive loss gathered across workers (CLIP; PGSeg's L_IT, METHODS.md 1.5).

L = 1/2 [CE(s I T_all^T, y) + CE(s T I_all^T, y)] with L2-normalised embeddings, the other side
gathered from every worker *with gradient* and labels ``arange(B) + rank * B``. Each worker's loss
is the mean over its own rows, so averaging gradients across workers (what DeepSpeed does) gives
exactly the single-process gradient of the global batch. open_clip's ``ClipLoss`` implements this
(``local_loss=True, gather_with_grad=True``); we wrap it to read rank and world size from
torch.distributed and to clamp the scale.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from open_clip.loss import ClipLoss
from torch import nn


class GatheredContrastiveLoss(nn.Module):
    def __init__(self, max_logit_scale: float = 100.0):
        super().__init__()
        self.max_logit_scale = max_logit_scale
        on = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if on else (0, 1)
        self.clip_loss = ClipLoss(
            local_loss=True, gather_with_grad=True, cache_labels=True, rank=rank, world_size=world
        )

    def forward(
        self, image_BD: torch.Tensor, text_BD: torch.Tensor, log_scale: torch.Tensor
    ) -> torch.Tensor:
        """Embeddings need not be normalised; ``log_scale`` is the learnable log of s (1 elem)."""
        scale = log_scale.exp().clamp(max=self.max_logit_scale)
        image_BD = nn.functional.normalize(image_BD, dim=-1)
        text_BD = nn.functional.normalize(text_BD, dim=-1)
        return self.clip_loss(image_BD, text_BD, scale)
