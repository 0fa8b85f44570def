"""Background/foreground-balanced cross-entropy for the VPL decoder (METHODS.md 2.3).

Pseudo-labels of WSSS are dominated by background pixels; WeCLIP (and VPL after it) therefore
averages the pixel CE separately over background pixels (label 0) and foreground pixels
(labels 1..K-1) and takes the mean of the two, so each group weighs half regardless of its area.
Pixels labelled ``ignore_index`` (255: uncertain pseudo-labels, VOC boundaries) take no part.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def balanced_ce(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255
) -> torch.Tensor:
    """Mean of (mean CE over background pixels) and (mean CE over foreground pixels).

    Args:
        logits: B x K x H x W. If its H x W differs from the labels', it is first upsampled
            bilinearly (align_corners=False) to the labels' size: the decoder predicts on the
            patch grid, the pseudo-labels are at pixel resolution.
        labels: B x H x W long, 0 = background, 1..K-1 = foreground, ``ignore_index`` = ignored.
        ignore_index: label value excluded from both groups.

    Returns a scalar: if one group has no pixel the loss is the other group's mean; with no
    valid pixel at all it is ``logits.sum() * 0`` (zero, keeping the graph). Computed in float32;
    no host synchronisation.
    """
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    labels = labels.long()
    ce = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none")
    bg = labels == 0
    fg = (labels != 0) & (labels != ignore_index)
    n_bg, n_fg = bg.sum(), fg.sum()
    bg_mean = (ce * bg).sum() / n_bg.clamp_min(1)
    fg_mean = (ce * fg).sum() / n_fg.clamp_min(1)
    groups = (n_bg > 0).float() + (n_fg > 0).float()  # an empty group's mean is exactly 0
    loss = (bg_mean + fg_mean) / groups.clamp_min(1)
    return torch.where(groups > 0, loss, logits.sum().float() * 0)
