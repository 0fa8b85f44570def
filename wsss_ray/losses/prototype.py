"""PGSeg's prototype loss L_PG with hard rejection (METHODS.md 1.4).

Given group tokens G and their matched prototypes P~ (detached), both B x K x C, as PGSeg's
``closs`` (``models/pgseg.py``):
    S = norm(G) norm(P~)^T                                           # B x K(groups) x K(protos)
    L_PG = mean over kept prototypes i of CE_groups(s S[:, i], target i)
         + mean over kept groups i     of CE_protos(s S[i, :], target i)
with one logit scale s = exp(log s) (clamped <= max) shared by every stage and the text side.
Hard rejection (HRS), one mask per term: for the first, min-max normalise S over the groups (per
prototype) and keep prototype i when its pair with group i scores > phi; for the second, min-max
normalise S^T over the prototypes (per group) and keep group i when its pair with prototype i scores
> phi. The reference reads column 0 of each normalised matrix instead of the diagonal (``gather``
with an ``arange`` index along dim 1): ``reference_column0=True`` reproduces both masks. A term
with no kept rows is 0 (the reference's mean over zero rows is NaN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def hard_rejection_keep(sim_BKK: torch.Tensor, phi: float, reference_column0: bool = False):
    """Bool B x K: row i of ``sim`` (B x rows x cols) is kept when its min-max normalised (over the
    rows, per column) similarity to column i (to column 0 with ``reference_column0``) is > phi."""
    lo = sim_BKK.min(dim=1, keepdim=True).values
    hi = sim_BKK.max(dim=1, keepdim=True).values
    norm = (sim_BKK - lo) / (hi - lo + 1e-6)  # the reference's eps
    picked = norm[..., 0] if reference_column0 else torch.diagonal(norm, dim1=1, dim2=2)
    return picked > phi


def _masked_ce(logits_BKK: torch.Tensor, keep_BK: torch.Tensor) -> torch.Tensor:
    """Mean over kept rows i of CE(row i, target i); 0 when no row is kept."""
    k = logits_BKK.shape[-1]
    target = torch.arange(k, device=logits_BKK.device).expand(logits_BKK.shape[0], -1)
    ce = F.cross_entropy(logits_BKK.reshape(-1, k), target.reshape(-1), reduction="none")
    w = keep_BK.reshape(-1).to(ce.dtype)
    return (ce * w).sum() / w.sum().clamp_min(1.0)


class PrototypeLoss(nn.Module):
    """L_PG for one set of group tokens and matched prototypes; the logit scale is passed in
    (the model's shared ``img_encoder.logit_scale``)."""

    def __init__(self, phi: float = 0.1, max_scale: float = 100.0, reference_column0: bool = False):
        super().__init__()
        self.phi, self.max_scale, self.reference_column0 = phi, max_scale, reference_column0

    def forward(self, groups_BKC: torch.Tensor, matched_BKC: torch.Tensor, log_scale: torch.Tensor):
        """Returns (loss, fraction of rows kept over both terms, a detached 0-d tensor)."""
        g = F.normalize(groups_BKC.float(), dim=-1)
        p = F.normalize(matched_BKC.detach().float(), dim=-1)
        gp = g @ p.transpose(1, 2)  # B x groups x protos
        pg = gp.transpose(1, 2)  # B x protos x groups
        keep_gp = hard_rejection_keep(gp.detach(), self.phi, self.reference_column0)
        keep_pg = hard_rejection_keep(pg.detach(), self.phi, self.reference_column0)
        scale = log_scale.float().exp().clamp(max=self.max_scale).reshape(())
        # the reference permutes each matrix before masking: rows of gp^T are prototypes (CE over
        # groups) and take gp's mask; rows of pg^T are groups (CE over prototypes), pg's mask
        loss = _masked_ce(pg * scale, keep_gp) + _masked_ce(gp * scale, keep_pg)
        kept = torch.cat([keep_gp, keep_pg], dim=1).float().mean().detach()
        return loss, kept
