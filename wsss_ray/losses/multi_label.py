"""GroupViT's multi-label (noun prompt) contrastive loss (METHODS.md 1.5, optional).

Image embeddings I (B x D) and the embeddings of each caption's n noun prompts P (B x n x D), both
L2-normalised; the other side gathered from every worker with gradient (GroupViT's
``dist_collect``). Soft targets as GroupViT's ``MultiLabelContrastive.multi_label_loss``
(``models/multi_label_contrastive.py``): an image puts 1/n on each of its own n prompts, a prompt
puts 1 on its own image; every other prompt and image of the global batch is a negative. The loss
is 1/2 [SoftCE(s I P_all^T) + SoftCE(s P I_all^T)], each the mean over this worker's rows, with
its own scale s = exp(log s) clamped <= 100 (``multi_label_logit_scale``, init 1/0.07).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip.loss import gather_features
from torch import nn


class MultiLabelLoss(nn.Module):
    def __init__(self, max_logit_scale: float = 100.0):
        super().__init__()
        self.max_logit_scale = max_logit_scale

    def forward(self, image_BD: torch.Tensor, prompts_BND: torch.Tensor, log_scale: torch.Tensor):
        on = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        rank, world = (dist.get_rank(), dist.get_world_size()) if on else (0, 1)
        b, n, _ = prompts_BND.shape
        img = F.normalize(image_BD.float(), dim=-1)
        txt = F.normalize(prompts_BND.float(), dim=-1).reshape(b * n, -1)
        if world > 1:
            all_img, all_txt = gather_features(img, txt, True, True, rank, world)
        else:
            all_img, all_txt = img, txt
        scale = log_scale.float().exp().clamp(max=self.max_logit_scale).reshape(())
        rows = torch.arange(b * n, device=img.device)  # prompt l of sample i: row i * n + l
        # image rows: 1/n on the columns (rank, i, 0..n-1) of the gathered prompts
        target_img = torch.zeros(b, world * b * n, device=img.device)
        target_img[rows // n, rank * b * n + rows] = 1.0 / n
        # prompt rows: 1 on their own image, column (rank, i) of the gathered images
        target_txt = torch.zeros(b * n, world * b, device=img.device)
        target_txt[rows, rank * b + rows // n] = 1.0
        loss_img = torch.sum(-target_img * F.log_softmax(scale * img @ all_txt.t(), dim=-1), -1)
        loss_txt = torch.sum(-target_txt * F.log_softmax(scale * txt @ all_img.t(), dim=-1), -1)
        return 0.5 * (loss_img.mean() + loss_txt.mean())
