"""Non-learnable prototypes by EM (PGSeg's NPR, METHODS.md 1.3; EMANet-style dot-product kernel).

For tokens X (B x N x C) and K prototypes, T iterations without gradient:
    Z = softmax_K(X mu^T);  Z <- Z / (sum_N Z + 1e-6);  mu = Z^T X;  mu <- mu / (|mu| + 1e-6)
starting from a buffer mu0 (K x C, unit rows). All samples run at once as batched matmuls; there
is no Python loop over samples or tokens. The buffer follows an EMA of the batch-mean prototypes,
averaged over every worker so all ranks keep the same buffer.

Reference variants (PGSeg, docs/FIDELITY.md):
- ``norm="prototype"``: mu normalised along K instead of along C (the reference's text-side NPR,
  ``models/transformer.py`` ``NPR``, which runs over 1-d tokens, where a unit row would be +-1);
- ``z_out="last_iteration"``: the responsibilities of the last iteration (computed with the
  previous mu and divided by their sum over tokens), which the reference multiplies with the final
  mu for its reconstruction; ``"final"`` (ours) is ``softmax_K(X mu^T)`` with the final mu;
- ``ema_renorm=False``: the EMA buffer is not re-normalised after the update (the reference).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

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
    norm: str = "channel",
    z_out: str = "final",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (prototypes mu B x K x C, unit rows with ``norm="channel"`` or unit columns with
    ``"prototype"``; responsibilities Z B x N x K: ``z_out="final"`` softmax over K with the final
    mu, ``"last_iteration"`` the last iteration's Z after its division by the sum over tokens).
    ``mask_BN`` (bool) excludes tokens such as text padding."""
    x = x_BNC.float()
    mu = mu0_KC.float().unsqueeze(0).expand(x.shape[0], -1, -1)  # B x K x C
    w = None if mask_BN is None else mask_BN.float().unsqueeze(-1)  # B x N x 1
    axis = -1 if norm == "channel" else 1
    z = None
    for _ in range(iters):
        z = torch.softmax(x @ mu.transpose(1, 2), dim=-1)  # B x N x K
        if w is not None:
            z = z * w
        z = z / (z.sum(dim=1, keepdim=True) + 1e-6)
        mu = z.transpose(1, 2) @ x  # B x K x C
        mu = mu / (mu.norm(dim=axis, keepdim=True) + 1e-6)  # the reference's eps (EMANet's)
    if z_out == "final" or z is None:
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
        norm: str = "channel",
        z_out: str = "final",
        ema_renorm: bool = True,
    ):
        super().__init__()
        if norm not in ("channel", "prototype") or z_out not in ("final", "last_iteration"):
            raise ValueError(f"EMPrototypes: norm {norm!r}, z_out {z_out!r}")
        axis = -1 if norm == "channel" else 0
        scale = dim if norm == "channel" else num_prototypes
        mu0 = torch.randn(num_prototypes, dim) * math.sqrt(2.0 / scale)
        self.register_buffer("mu0", F.normalize(mu0, dim=axis))
        self.iters, self.momentum, self.ema = iters, momentum, ema
        self.norm, self.z_out, self.ema_renorm = norm, z_out, ema_renorm
        #: when set, ``update_buffer`` keeps the batch mean for :func:`flush_prototype_updates`
        #: (one all-reduce for every module of a model, not one each)
        self.deferred = False
        self._pending: torch.Tensor | None = None

    def forward(self, x_BNC: torch.Tensor, mask_BN: torch.Tensor | None = None):
        mu, z = em_prototypes(x_BNC, self.mu0, self.iters, mask_BN, self.norm, self.z_out)
        if self.training and self.ema:
            self.update_buffer(mu)
        return mu, z

    @torch.no_grad()
    def update_buffer(self, mu_BKC: torch.Tensor) -> None:
        """mu0 <- m mu0 + (1 - m) mean over the batch *and all workers* of mu; then unit rows
        (columns with ``norm="prototype"``), unless ``ema_renorm`` is off (the reference)."""
        mean = mu_BKC.float().mean(dim=0)
        if self.deferred:
            self._pending = mean
            return
        if _world() > 1:
            dist.all_reduce(mean)
            mean /= dist.get_world_size()
        self._ema(mean)

    @torch.no_grad()
    def _ema(self, mean: torch.Tensor) -> None:
        new = self.momentum * self.mu0.float() + (1 - self.momentum) * mean
        if self.ema_renorm:
            new = F.normalize(new, dim=-1 if self.norm == "channel" else 0)
        self.mu0.copy_(new.to(self.mu0.dtype))


def _world() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


@torch.no_grad()
def flush_prototype_updates(module: nn.Module | Iterable[nn.Module]) -> int:
    """Apply the deferred EMA updates of every :class:`EMPrototypes` in ``module`` (a model,
    or the prototype modules themselves, found once: no walk over the model each step) with one
    all-reduce of all their batch means (instead of one per module per step); returns how
    many. The same result as updating each right after its forward, as long as no module runs
    twice in one forward (each ``mu0`` is read only by its own forward)."""
    found = module.modules() if isinstance(module, nn.Module) else module
    ems = [m for m in found if isinstance(m, EMPrototypes) and m._pending is not None]
    if not ems:
        return 0
    flat = torch.cat([m._pending.reshape(-1) for m in ems])
    if _world() > 1:
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
    offset = 0
    for m in ems:
        n = m._pending.numel()
        m._ema(flat[offset : offset + n].view_as(m._pending))
        m._pending = None
        offset += n
    return len(ems)
