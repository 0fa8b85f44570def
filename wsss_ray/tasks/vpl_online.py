"""WeCLIP's online pseudo-labels for phase 2 (``online.enabled``): per training batch, the frozen
CLIP's own CAMs become the decoder's targets, so phase 2 needs no phase-1 label files.

Per image, with its image-level labels Y (from the ground-truth mask, as WeCLIP reads them):
1. softmax-GradCAM of the last block over (Y's class prompts + the background words), the image
   feature being the mean patch token (CLIP-ES's);
2. CAA: the transition matrix from the mean attention of the last ``refine_layers`` blocks, or,
   once the step count reaches ``rfm_start``, from WeCLIP's refinement module (RFM): the last
   ``rfm_layers`` blocks filtered and weighted by the decoder's own affinity ``sigmoid(F^T F)``
   of the same batch (:func:`wsss_ray.ops.affinity.rfm_attention`); per class the columns are
   masked to the boxes of the CAM's confident regions (0.4, COCO 0.7) and the result min-max
   normalised;
3. upsampled to the crop, background ``(1 - max)^alpha`` stacked in front, refined by PAR
   (:mod:`wsss_ray.ops.par`, on the normalised image), argmax -> class ids; crop padding -> 255.

WeCLIP: ``WeCLIP_model/model_attn_aff_voc.py`` (``forward``), ``clip/clip_tool.py``
(``perform_single_voc_cam``, ``generate_cam_label``), ``WeCLIP_model/PAR.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wsss_ray.losses.affinity import IGNORE


class OnlineLabeler:
    """Turns one batch's frozen-CLIP outputs into pixel labels (no gradient leaves it)."""

    def __init__(
        self,
        dense,
        prototypes: torch.Tensor,
        num_fg: int,
        cfg,
        box_thresh: float,
        tau: float | None = None,
    ):
        """``prototypes``: K x D rows, the foreground classes then the background words (text
        prototypes, or phase-1 W with its ``tau`` = tau_I); ``cfg``: an OnlineLabelConfig."""
        self.dense = dense
        self.protos = prototypes.float()
        self.num_fg = num_fg
        self.cfg = cfg
        self.box = box_thresh
        self.tau = tau

    @property
    def attn_layers(self) -> int:
        """How many blocks' attention the CLIP forward must return."""
        return max(self.cfg.refine_layers, self.cfg.rfm_layers)

    def logits(self, feat: torch.Tensor, rows: list[int]) -> torch.Tensor:
        protos = self.protos[rows].to(feat.device)
        feat = F.normalize(feat.float(), dim=-1)
        if self.tau is None:
            return self.dense.logit_scale * feat @ F.normalize(protos, dim=-1).T
        return feat @ protos.T / self.tau

    def __call__(
        self,
        images: torch.Tensor,
        out: dict,
        present: torch.Tensor,
        valid: torch.Tensor,
        seg_affinity: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """B x H x W long labels for normalised ``images`` (B x 3 x H x W); ``out``: the dense
        CLIP's outputs with ``cam=True`` and :attr:`attn_layers`; ``present``: B x C multi-hot
        (column 0 = background); ``valid``: B x H x W bool (False = crop padding);
        ``seg_affinity``: the decoder's B x N x N affinity, given once RFM is on."""
        from wsss_ray.ops.affinity import attention_transition, caa_refine, rfm_attention
        from wsss_ray.ops.cam import softmax_gradcam
        from wsss_ray.ops.par import par_refine

        b, _, hh, ww = images.shape
        grid = out["grid"]
        bg_rows = list(range(self.num_fg, self.protos.shape[0]))
        labels = torch.zeros(b, hh, ww, dtype=torch.long, device=images.device)
        for i in range(b):
            classes = [int(c) for c in present[i].nonzero().flatten().tolist() if c > 0]
            if classes:
                rows = [c - 1 for c in classes] + bg_rows
                with torch.enable_grad():
                    logits = self.logits(out["image_feat"][i : i + 1], rows)
                    cams = softmax_gradcam(
                        out["ln1_parts"][i], logits, range(len(classes)), grid, retain_graph=True
                    )[0]
                attn = out["attn"][:, i].detach().float()
                if seg_affinity is not None:
                    a = rfm_attention(attn[-self.cfg.rfm_layers :], seg_affinity[i])
                else:
                    a = attn[-self.cfg.refine_layers :].mean(0)
                refined = caa_refine(cams, attention_transition(a), self.box)
                # WeCLIP resizes the normalised maps (cv2.resize, half-pixel bilinear) as they are
                up = F.interpolate(refined[None], (hh, ww), mode="bilinear", align_corners=False)[0]
                bg = (1 - up.max(0, keepdim=True)[0]).clamp_min(0) ** self.cfg.alpha
                scores = torch.cat([bg, up])
                if self.cfg.par_iters:
                    scores = par_refine(
                        images[i : i + 1], scores[None], self.cfg.par_iters, self.cfg.par_dilations
                    )[0]
                ids = torch.tensor([0, *classes], device=images.device)
                labels[i] = ids[scores.argmax(0)]
            labels[i][~valid[i]] = IGNORE
        return labels
