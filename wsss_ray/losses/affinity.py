"""WeCLIP's affinity loss: the decoder's token affinity ``sigmoid(F^T F)`` (B x N x N over the
patch grid) is pulled to 1 for pairs of patches the pseudo-label gives the same class and to 0
for pairs it gives different classes, within a window (Chebyshev distance <= radius, 8 for a
20 x 20 grid) and never for ignored patches:

    L_aff = 0.5 * sum_pos (1 - A) / (n_pos + 1) + 0.5 * sum_neg A / (n_neg + 1)

The labels are taken to the grid by nearest-neighbour resizing. Pure PyTorch; no Ray.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = 255


def radius_mask(h: int, w: int, radius: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """N x N bool (N = h*w, row-major): True where two patches are within ``radius`` rows and
    ``radius`` columns of each other."""
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"
    )
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    near_y = (ys[:, None] - ys[None, :]).abs() <= radius
    near_x = (xs[:, None] - xs[None, :]).abs() <= radius
    return near_y & near_x


def affinity_label(
    labels: torch.Tensor, grid: tuple[int, int], mask: torch.Tensor | None = None
) -> torch.Tensor:
    """B x N x N long targets from B x H x W labels (255 = ignore): 1 same class, 0 different,
    255 outside ``mask`` (N x N bool) or where either patch is ignored."""
    small = F.interpolate(labels[:, None].float(), size=tuple(grid), mode="nearest")
    flat = small.reshape(labels.shape[0], -1).long()  # B x N
    target = (flat[:, :, None] == flat[:, None, :]).long()
    if mask is not None:
        target[:, ~mask] = IGNORE
    ignored = flat == IGNORE
    target[ignored[:, :, None].expand_as(target)] = IGNORE
    target[ignored[:, None, :].expand_as(target)] = IGNORE
    return target


def affinity_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``L_aff`` of the module docstring for affinities ``pred`` in [0, 1] and targets."""
    pos = (target == 1).to(pred.dtype)
    neg = (target == 0).to(pred.dtype)
    pos_loss = (pos * (1 - pred)).sum() / (pos.sum() + 1)
    neg_loss = (neg * pred).sum() / (neg.sum() + 1)
    return 0.5 * pos_loss + 0.5 * neg_loss
