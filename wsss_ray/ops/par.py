"""Pixel-adaptive refinement (PAR) of class score maps by the image's local colour affinity, as
WeCLIP refines its online pseudo-labels (from AFA, Ru et al. 2022). Pure PyTorch; no Ray.

For every pixel p and each of its 8 neighbours q at each dilation d (replicate padding, so a
border pixel's missing neighbours are its nearest pixels):

    k_col(p, q) = -( |I(q) - I(p)| / (std_q' I(q') + 1e-8) / w1 )^2, averaged over channels
    k_pos(p, q) = -( dist(p, q) / std_q' dist(q') / w1 )^2          (dist = d, or d*sqrt(2))
    a(p, .) = softmax_q k_col(p, .) + w2 * softmax_q k_pos(p, .)

(``std`` over the 8 * len(dilations) neighbours, unbiased), and ``num_iter`` times
``m(p) <- sum_q a(p, q) m(q)``. The image is resized to the maps' size (bilinear,
``align_corners=True``) first. Defaults: WeCLIP's (20 iterations, dilations 1, 2, 4, 8, 12, 24,
w1 0.3, w2 0.01).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

#: the 8 neighbour offsets (dy, dx), row by row; the diagonals are at 0, 2, 5, 7
OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def neighbours(x: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """B x C x (8 * len(dilations)) x H x W: each pixel's 8 neighbours at each dilation, with
    replicate padding."""
    _, _, h, w = x.shape
    out = []
    for d in dilations:
        p = F.pad(x, [d] * 4, mode="replicate")
        for dy, dx in OFFSETS:
            out.append(p[..., d + dy * d : d + dy * d + h, d + dx * d : d + dx * d + w])
    return torch.stack(out, 2)


def par_affinity(
    image: torch.Tensor,
    dilations: Sequence[int] = (1, 2, 4, 8, 12, 24),
    w1: float = 0.3,
    w2: float = 0.01,
) -> torch.Tensor:
    """B x 1 x M x H x W neighbour weights of ``image`` (B x C x H x W), M = 8 * len(dilations);
    each pixel's weights sum to 1 + w2."""
    nb = neighbours(image, dilations)  # B x C x M x H x W
    col = -(((nb - image.unsqueeze(2)).abs() / (nb.std(2, keepdim=True) + 1e-8) / w1) ** 2)
    col = col.mean(1, keepdim=True)
    dist = torch.tensor(
        [d * (math.sqrt(2) if dy and dx else 1.0) for d in dilations for dy, dx in OFFSETS],
        dtype=image.dtype,
        device=image.device,
    )
    pos = -(((dist / (dist.std() + 1e-8)) / w1) ** 2)
    return col.softmax(2) + w2 * pos.softmax(0).view(1, 1, -1, 1, 1)


@torch.no_grad()
def par_refine(
    image: torch.Tensor,
    maps: torch.Tensor,
    num_iter: int = 20,
    dilations: Sequence[int] = (1, 2, 4, 8, 12, 24),
    w1: float = 0.3,
    w2: float = 0.01,
) -> torch.Tensor:
    """``maps`` (B x K x H x W) propagated ``num_iter`` times by :func:`par_affinity` of
    ``image`` (B x C x H' x W', resized to H x W)."""
    if image.dim() != 4 or maps.dim() != 4 or image.shape[0] != maps.shape[0]:
        raise ValueError(f"want B x C x H x W image and maps, got {image.shape}, {maps.shape}")
    image = F.interpolate(image.float(), size=maps.shape[-2:], mode="bilinear", align_corners=True)
    aff = par_affinity(image, dilations, w1, w2)
    m = maps.float()
    for _ in range(num_iter):
        m = (neighbours(m, dilations) * aff).sum(2)
    return m
