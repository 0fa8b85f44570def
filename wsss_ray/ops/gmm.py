"""Non-learnable prototypes by EM (PGSeg's NPR, METHODS.md 1.3; EMANet-style dot-product kernel).

For tokens X (B x N x C) and K prototypes, T iterations without gradient:
    Z = softmax_K(X mu^T);  Z <- Z / (sum_N Z + 1e-6);  mu = Z^T X;  mu <- l2norm(mu)
starting from a buffer mu0 (K x C, unit rows). All samples run at once as batched matmuls; there
is no Python loop over samples or tokens. The buffer follows an EMA of the batch-mean prototypes,
averaged over every worker so all ranks keep the same buffer.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def em_prototypes(
    x_BNC: torch.Tensor,
    mu0_KC: torch.Tensor,
    iters: int = 10,
    mask_BN: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (prototypes mu B x K x C with unit rows, responsibilities Z B x N x K, softmax over
    K, computed with the final mu). ``mask_BN`` (bool) excludes tokens such as text padding."""
    x = x_BNC.float()
    mu = mu0_KC.float().unsqueeze(0).expand(x.shape[0], -1, -1)  # B x K x C
    w = None if mask_BN is None else mask_BN.float().unsqueeze(-1)  # B x N x 1
    for _ in range(iters):
        z = torch.softmax(x @ mu.transpose(1, 2), dim=-1)  # B x N x K
        if w is not None:
            z = z * w
        z = z / (z.sum(dim=1, keepdim=True) + 1e-6)
        mu = F.normalize(z.transpose(1, 2) @ x, dim=-1)  # B x K x C
    z = torch.softmax(x @ mu.transpose(1, 2), dim=-1)
    if w is not None:
        z = z * w
    return mu.to(x_BNC.dtype), z.to(x_BNC.dtype)


class EMPrototypes(nn.Module):
    """EM prototypes with an EMA-updated initial buffer ``mu0`` (K x C)."""

    def __init__(
        self,
        num_prototypes: int,
        dim: int,
        iters: int = 10,
        momentum: float = 0.9,
        ema: bool = True,
    ):
        super().__init__()
        mu0 = torch.randn(num_prototypes, dim) * math.sqrt(2.0 / dim)
        self.register_buffer("mu0", F.normalize(mu0, dim=-1))
        self.iters, self.momentum, self.ema = iters, momentum, ema

    def forward(self, x_BNC: torch.Tensor, mask_BN: torch.Tensor | None = None):
        mu, z = em_prototypes(x_BNC, self.mu0, self.iters, mask_BN)
        if self.training and self.ema:
            self.update_buffer(mu)
        return mu, z

    @torch.no_grad()
    def update_buffer(self, mu_BKC: torch.Tensor) -> None:
        """mu0 <- m mu0 + (1 - m) mean over the batch *and all workers* of mu; unit rows."""
        mean = mu_BKC.float().mean(dim=0)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(mean)
            mean /= dist.get_world_size()
        new = self.momentum * self.mu0.float() + (1 - self.momentum) * mean
        self.mu0.copy_(F.normalize(new, dim=-1).to(self.mu0.dtype))
