"""Regional Semantic Contrast (RSC) for VPL's decoder (METHODS.md 2.3, our design).

The vision prototypes W (phase 1, R x D in CLIP's joint space) cut every image into regions:
each pixel goes to the prototype row that explains its frozen CLIP feature best, among the rows
allowed by the image-level labels (present classes plus all background rows). Each region's
embedding, the masked average of the decoder's joint-space feature map, is then pulled towards
its own prototype and pushed from all the others by an InfoNCE over the R prototypes.

Prototype rows: one per foreground class plus several background-word rows. ``row_class`` (R)
gives each row's label class: 0 for every background row, 1..K-1 for the foreground rows.
``background="one"`` (the default, METHODS 2.3: a region per class in Y_i + background) merges
the background rows: pixels assigned to any background word form one background region, whose
prototype is the normalised mean of the normalised background rows; the InfoNCE is then over
the K class prototypes. ``background="words"`` forms a region per *row*, so background words are
separate regions and compete with each other as they do in phase 1's softmax.

Absent classes never form a region (their rows are masked out of the assignment), but their
prototypes remain negatives in the InfoNCE denominator, which is over all R rows as in METHODS
("sum over c'"): pushing a region away from classes the image does not contain is wanted.

Only the decoder's embedding receives gradient; prototypes are frozen buffers and the region
assignment is computed without gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def region_masks(
    clip_feats: torch.Tensor,
    prototypes: torch.Tensor,
    row_class: torch.Tensor,
    present: torch.Tensor,
    tau: float = 0.07,
) -> torch.Tensor:
    """Assign every pixel to one allowed prototype row.

    Args:
        clip_feats: B x N x D frozen dense CLIP features (L2-normalised here).
        prototypes: R x D vision prototypes W, used as given (their row norms are part of the
            learned solution, so they are not normalised).
        row_class: R long, each row's class (0 = background).
        present: B x K bool image-level labels; background rows are always allowed.
        tau: temperature of p_ik = softmax_r(W f / tau). It does not change the argmax; it is
            kept so the assignment is stated as the argmax of phase 1's prediction.

    Returns B x R x N bool: mask[b, r, n] is True iff row r is the argmax of p over the rows
    allowed for image b. Each pixel belongs to exactly one allowed row.
    """
    f = F.normalize(clip_feats.float(), dim=-1)
    logits = f @ prototypes.float().t() / tau  # B x N x R
    row_class = row_class.long().to(present.device)
    allowed = present.bool()[:, row_class] | (row_class == 0)[None]  # B x R
    logits = logits.masked_fill(~allowed[:, None, :], float("-inf"))
    best = logits.argmax(dim=-1)  # B x N
    r = prototypes.shape[0]
    return F.one_hot(best, r).bool().transpose(1, 2)  # B x R x N


def rsc_loss(
    embed: torch.Tensor, masks: torch.Tensor, prototypes: torch.Tensor, tau: float = 0.1
) -> tuple[torch.Tensor, dict[str, float]]:
    """InfoNCE of region embeddings against the prototypes.

    Args:
        embed: B x D x h x w decoder joint-space map (or B x N x D, N = h*w), not normalised.
        masks: B x R x N bool regions (from :func:`region_masks`).
        prototypes: R x D; normalised here and detached.
        tau: InfoNCE temperature tau_r.

    r_br = normalise(masked mean of embed over masks[b, r]); over the non-empty regions,
    loss = mean of -log softmax_r'(cos(r_br, w_r') / tau)[r]. With no non-empty region the loss
    is ``embed.sum() * 0``. Metrics: "rsc/regions" (number of non-empty regions) and "rsc/acc"
    (fraction of them whose most similar prototype is their own row).
    """
    if embed.dim() == 4:
        embed = embed.flatten(2).transpose(1, 2)  # B x N x D
    if masks.shape[-1] != embed.shape[1]:
        raise ValueError(f"masks cover {masks.shape[-1]} pixels, embed has {embed.shape[1]}")
    m = masks.to(torch.float32)
    counts = m.sum(dim=-1)  # B x R
    sums = m @ embed.float()  # B x R x D
    regions = F.normalize(sums / counts.clamp_min(1)[..., None], dim=-1)
    w = F.normalize(prototypes.detach().float(), dim=-1)
    logits = regions @ w.t() / tau  # B x R x R
    valid = counts > 0
    n = int(valid.sum())
    if n == 0:
        return embed.sum() * 0, {"rsc/regions": 0.0, "rsc/acc": 0.0}
    rows = torch.arange(w.shape[0], device=logits.device).expand_as(counts)
    sel_logits, sel_rows = logits[valid], rows[valid]  # n x R, n
    loss = F.cross_entropy(sel_logits, sel_rows)
    acc = (sel_logits.argmax(dim=-1) == sel_rows).float().mean()
    return loss, {"rsc/regions": float(n), "rsc/acc": float(acc)}


class RSCLoss(nn.Module):
    """RSC with frozen prototypes: regions from the CLIP features, InfoNCE on the decoder's embed.

    Args:
        prototypes: R x D vision prototypes W (stored as a buffer, never trained).
        row_class: R long, each row's class (0 = background).
        tau_r: InfoNCE temperature (METHODS 0.1).
        tau_i: temperature of the prototype prediction p_ik (phase 1's tau_I, 0.07).
        background: ``words`` (a region per row) | ``one`` (one background class; see the
            module docstring). ``rsc.background`` in the config, ``one`` by default there.
    """

    def __init__(
        self,
        prototypes: torch.Tensor,
        row_class: torch.Tensor,
        tau_r: float = 0.1,
        tau_i: float = 0.07,
        background: str = "words",
    ):
        super().__init__()
        if prototypes.dim() != 2 or row_class.shape != (prototypes.shape[0],):
            raise ValueError(
                f"prototypes must be R x D and row_class R, got {tuple(prototypes.shape)} "
                f"and {tuple(row_class.shape)}"
            )
        if background not in ("words", "one"):
            raise ValueError(f"background: words | one, got {background!r}")
        self.register_buffer("prototypes", prototypes.detach().clone().float())
        self.register_buffer("row_class", row_class.detach().clone().long())
        self.tau_r, self.tau_i, self.background = tau_r, tau_i, background
        if background == "one":
            k = int(row_class.max()) + 1
            onehot = F.one_hot(row_class.long(), k).float()  # R x K
            w = F.normalize(prototypes.detach().float(), dim=-1)
            per_class = F.normalize((onehot.t() @ w) / onehot.sum(0).clamp_min(1)[:, None], dim=-1)
            self.register_buffer("row_to_class", onehot)
            self.register_buffer("class_prototypes", per_class)

    def forward(
        self, embed: torch.Tensor, clip_feats: torch.Tensor, present: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """embed: B x D x h x w (or B x N x D); clip_feats: B x N x D; present: B x K bool."""
        masks = region_masks(clip_feats, self.prototypes, self.row_class, present, self.tau_i)
        if self.background == "one":  # B x R x N -> B x K x N: rows of one class merge
            merged = torch.einsum("brn,rk->bkn", masks.float(), self.row_to_class) > 0
            return rsc_loss(embed, merged, self.class_prototypes, self.tau_r)
        return rsc_loss(embed, masks, self.prototypes, self.tau_r)
