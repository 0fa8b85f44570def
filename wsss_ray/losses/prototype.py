"""PGSeg's prototype loss L_PG with hard rejection (METHODS.md 1.4).

Given group tokens G and their matched prototypes P~ (detached), both B x K x C:
    S = norm(G) norm(P~)^T * scale                                   # B x K(groups) x K(protos)
    L_PG = CE over groups for each prototype (target = its index)
         + CE over prototypes for each group (target = its index)
Hard rejection (HRS): min-max normalise S along the group axis and keep only the pairs whose
normalised *diagonal* similarity is > phi. The reference tests column 0 instead of the diagonal;
``reference_column0=True`` reproduces that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def hard_rejection_keep(sim_BKK: torch.Tensor, phi: float, reference_column0: bool = False):
    """Bool B x K: which (group i, prototype i) pairs take part in the loss."""
    lo = sim_BKK.min(dim=1, keepdim=True).values
    hi = sim_BKK.max(dim=1, keepdim=True).values
    norm = (sim_BKK - lo) / (hi - lo).clamp_min(1e-6)  # min-max over groups, per prototype
    picked = norm[..., 0] if reference_column0 else torch.diagonal(norm, dim1=1, dim2=2)
    return picked > phi


class PrototypeLoss(nn.Module):
    def __init__(
        self,
        phi: float = 0.1,
        init_scale: float = 1 / 0.1,
        max_scale: float = 100.0,
        reference_column0: bool = False,
    ):
        super().__init__()
        self.log_scale = nn.Parameter(torch.full((1,), float(init_scale)).log())
        self.phi, self.max_scale, self.reference_column0 = phi, max_scale, reference_column0

    def forward(self, groups_BKC: torch.Tensor, matched_BKC: torch.Tensor):
        """Returns (loss, fraction of pairs kept as a detached 0-d tensor: no host sync)."""
        g = F.normalize(groups_BKC.float(), dim=-1)
        p = F.normalize(matched_BKC.detach().float(), dim=-1)
        cos = g @ p.transpose(1, 2)  # B x K x K
        keep = hard_rejection_keep(cos.detach(), self.phi, self.reference_column0)  # B x K
        logits = cos * self.log_scale.exp().clamp(max=self.max_scale)
        k = logits.shape[-1]
        target = torch.arange(k, device=logits.device).expand(logits.shape[0], -1)
        per_group = F.cross_entropy(logits.reshape(-1, k), target.reshape(-1), reduction="none")
        per_proto = F.cross_entropy(
            logits.transpose(1, 2).reshape(-1, k), target.reshape(-1), reduction="none"
        )
        w = keep.reshape(-1).float()
        loss = ((per_group + per_proto) * w).sum() / w.sum().clamp_min(1.0)
        return loss, w.mean().detach()
