"""Zero-shot (open-vocabulary) segmentation with a PGSeg/GroupViT model (METHODS.md 1.7).

Per window:
1. chain the **soft** assignment maps of the grouping stages (N x K1 @ K1 x K2 = N x 8),
   resize bilinearly to the window, argmax: every pixel belongs to one of the final groups;
2. class text embeddings from prompt templates ("a photo of a {}.", averaged, normalised);
3. group-class affinity = softmax(s cos(group, class)) restricted to the image's top-k classes
   (ranked by the pooled image embedding), multiplied by the unrestricted softmax;
4. background as GroupViT's ``GroupViTSegInference.encode_decode`` (``segmentation/evaluation/
   group_vit_seg.py``): per window ``t = min(bg_thresh, max affinity over groups and classes)`` and
   a 0/1 background channel, 1 where the pixel's best class scores below ``t`` (so the window's
   most confident group is never background).
Whole images as mmseg's ``Resize(img_scale=(2048, 448), keep_ratio=True)`` and
``slide_inference``: scale by ``min(448 / short side, 2048 / long side)``, slide a 448 window with
stride 224, average the overlapping scores (the background channel becomes the fraction of
windows that call the pixel background), resize the scores back to the original size, argmax.

This module is pure torch (the segmenter wraps any ``PGSeg``); ``wsss_ray.eval.pgseg`` runs it as
Ray Data batch inference and the training loop runs it on a small validation set.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

#: ``zero_shot.class_names: readable``: names that read better in a prompt than the dataset's
#: file-system spellings
PROMPT_NAMES = {
    "aeroplane": "aeroplane",
    "diningtable": "dining table",
    "pottedplant": "potted plant",
    "tvmonitor": "tv monitor",
    "motorbike": "motorbike",
}

#: ``zero_shot.class_names: reference``: the names GroupViT and PGSeg put in the prompts, per
#: official dataset (``segmentation/datasets/{pascal_voc,pascal_context,coco_object}.py``
#: CLASSES), by the dataset's own spelling; PGSeg's COCO list differs in one entry ('aeroplane '
#: with a trailing space for 'airplane': docs/FIDELITY.md)
REFERENCE_RENAMES = {
    "voc": {"diningtable": "table", "pottedplant": "plant", "tvmonitor": "monitor"},
    "context": {"aeroplane": "airplane", "pottedplant": "plant", "tvmonitor": "monitor"},
    "coco_object": {},
    "coco": {},
}


def prompt_class_names(dataset: str, class_names: list[str], mode: str = "reference") -> list[str]:
    """The names the prompts use for ``class_names`` of ``dataset`` (voc | context | coco |
    coco_object | anything else): the reference's spellings (``reference``) or readable ones
    (``readable``: dining table, potted plant, tv monitor). Any other name (the synthetic world,
    a custom ``class_names.txt``) is used as it is, underscores as spaces."""
    table = REFERENCE_RENAMES.get(dataset, {}) if mode == "reference" else PROMPT_NAMES
    return [table.get(n, n.replace("_", " ")) for n in class_names]


def chain_assignments(stages: list[dict]) -> torch.Tensor:
    """B x N x K_last: each token's soft membership of the final groups. ``attn_soft`` of a stage
    is B x K x N (softmax over K), so the chain is A1^T @ A2^T @ ..."""
    chain = stages[0]["attn_soft"].float().transpose(1, 2)
    for stage in stages[1:]:
        chain = chain @ stage["attn_soft"].float().transpose(1, 2)
    return chain


def group_class_affinity(
    group_emb: torch.Tensor,
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: float,
    topk: int,
) -> torch.Tensor:
    """B x G x C: softmax(s cos) restricted to each image's top-k classes, times the
    unrestricted softmax. Embeddings are normalised here."""
    g = F.normalize(group_emb.float(), dim=-1)
    t = F.normalize(text_emb.float(), dim=-1)
    i = F.normalize(image_emb.float(), dim=-1)
    logits = logit_scale * g @ t.t()  # B x G x C
    full = logits.softmax(-1)
    k = min(topk, t.shape[0]) if topk > 0 else t.shape[0]
    top = (logit_scale * i @ t.t()).topk(k, dim=-1).indices  # B x k
    mask = torch.full_like(logits[:, 0], float("-inf")).scatter_(1, top, 0.0)  # B x C
    return (logits + mask[:, None]).softmax(-1) * full


def pixel_scores(
    chain: torch.Tensor, grid: tuple[int, int], affinity: torch.Tensor, out_hw: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel class scores B x C x H x W and the group index map B x H x W: the chained
    soft assignment is resized bilinearly, argmax picks one group per pixel, the pixel takes
    that group's affinity row."""
    b, n, g = chain.shape
    maps = chain.transpose(1, 2).reshape(b, g, *grid)
    maps = F.interpolate(maps, size=out_hw, mode="bilinear", align_corners=False)
    groups = maps.argmax(1)  # B x H x W
    scores = torch.gather(
        affinity[:, None].expand(-1, out_hw[0] * out_hw[1], -1, -1),
        2,
        groups.reshape(b, -1, 1, 1).expand(-1, -1, 1, affinity.shape[-1]),
    ).reshape(b, *out_hw, -1)
    return scores.permute(0, 3, 1, 2), groups


def with_background(
    fg_scores: torch.Tensor, affinity: torch.Tensor, bg_thresh: float
) -> torch.Tensor:
    """Prepend GroupViT's background channel to B x C x H x W scores: per window
    ``t = min(bg_thresh, affinity.max())`` (``affinity`` B x G x C) and 1 where the pixel's best
    class scores below ``t``, else 0."""
    t = affinity.flatten(1).amax(dim=1).clamp(max=bg_thresh).view(-1, 1, 1)
    bg = (fg_scores.amax(dim=1) < t).to(fg_scores.dtype)
    return torch.cat([bg[:, None], fg_scores], dim=1)


def rescaled_size(h: int, w: int, short_side: int, max_long_side: int) -> tuple[int, int]:
    """mmcv's ``imrescale`` to ``(max_long_side, short_side)`` with ``keep_ratio``: the scale is
    ``min(short_side / short, max_long_side / long)`` (0 = no cap on the long side), each side
    ``int(side * scale + 0.5)``."""
    scale = short_side / min(h, w)
    if max_long_side > 0:
        scale = min(scale, max_long_side / max(h, w))
    return max(int(h * scale + 0.5), 1), max(int(w * scale + 0.5), 1)


def _windows(h: int, w: int, win: int, stride: int) -> list[tuple[int, int, int, int]]:
    """mmseg's slide_inference windows: a grid with stride, the last window flush with the edge."""
    out = []
    nh = max(h - win + stride - 1, 0) // stride + 1
    nw = max(w - win + stride - 1, 0) // stride + 1
    for i in range(nh):
        for j in range(nw):
            y2, x2 = min(i * stride + win, h), min(j * stride + win, w)
            y1, x1 = max(y2 - win, 0), max(x2 - win, 0)
            out.append((y1, y2, x1, x2))
    return out


class ZeroShotSegmenter:
    """Label maps for uint8 RGB images from a PGSeg model and a list of class names
    (index 0 = background; text embeddings are built for the foreground classes)."""

    def __init__(
        self,
        model: torch.nn.Module,
        class_names: list[str],
        tokenizer,
        templates: list[str],
        topk: int = 5,
        bg_thresh: float = 0.95,
        short_side: int = 448,
        max_long_side: int = 2048,
        window: int = 448,
        stride: int = 224,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        device: str | torch.device = "cpu",
        prompt_names: list[str] | None = None,
    ):
        from wsss_ray.config import IMAGENET_MEAN, IMAGENET_STD

        self.model, self.class_names = model, list(class_names)
        #: the names in the prompts (index 0, background, has none)
        self.prompt_names = list(prompt_names or prompt_class_names("", class_names, "readable"))
        self.topk, self.bg_thresh = topk, bg_thresh
        self.short_side, self.window, self.stride = short_side, window, stride
        self.max_long_side = max_long_side
        self.device = torch.device(device)
        self.mean = torch.tensor(mean or IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std or IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        self.dtype = next(model.parameters()).dtype
        self.text_emb = self.class_embeddings(tokenizer, templates)

    @torch.no_grad()
    def class_embeddings(self, tokenizer, templates: list[str]) -> torch.Tensor:
        """C_fg x D: per class, the normalised mean of its normalised template embeddings."""
        was_training = self.model.training
        self.model.eval()
        out = []
        for name in self.prompt_names[1:]:
            tokens = tokenizer([t.format(name) for t in templates]).to(self.device)
            emb = F.normalize(self.model.encode_text(tokens)["embed"].float(), dim=-1)
            out.append(F.normalize(emb.mean(0), dim=-1))
        self.model.train(was_training)
        return torch.stack(out)

    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().float().exp().clamp(max=100).reshape(-1)[0])

    @torch.no_grad()
    def window_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (B x (1 + C) x h x w, background first) and group maps of normalised windows."""
        out = self.model.encode_image(x.to(self.dtype))
        chain = chain_assignments(out["stages"])
        tokens = out["tokens"]  # B x G x dim, the final group tokens
        b, g, d = tokens.shape
        group_emb = self.model.img_projector(tokens.reshape(b * g, d)).reshape(b, g, -1)
        aff = group_class_affinity(
            group_emb, out["embed"], self.text_emb, self.logit_scale(), self.topk
        )
        scores, groups = pixel_scores(chain, out["grid"], aff, tuple(x.shape[-2:]))
        return with_background(scores, aff, self.bg_thresh), groups

    @torch.no_grad()
    def predict(self, image: np.ndarray, with_groups: bool = False):
        """H x W uint8 labels (0 = background, c = class_names[c]); with ``with_groups`` also
        the H x W final-group index map (ids distinct per window; later windows overwrite)."""
        was_training = self.model.training
        self.model.eval()
        try:
            h0, w0 = image.shape[:2]
            x = torch.from_numpy(np.array(image, copy=True)).to(self.device)  # Arrow: read-only
            x = x.permute(2, 0, 1)[None].float() / 255.0
            h, w = rescaled_size(h0, w0, self.short_side, self.max_long_side)
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
            x = (x - self.mean) / self.std
            boxes = _windows(h, w, self.window, self.stride)
            # every window is min(window, h) x min(window, w): one batch
            crops = torch.cat([x[..., y1:y2, x1:x2] for y1, y2, x1, x2 in boxes])
            scores, groups = self.window_scores(crops)
            total = torch.zeros(1, len(self.class_names), h, w, device=self.device)
            count = torch.zeros(1, 1, h, w, device=self.device)
            group_map = torch.zeros(h, w, dtype=torch.long, device=self.device)
            n_groups = int(groups.max()) + 1
            for k, (y1, y2, x1, x2) in enumerate(boxes):
                total[..., y1:y2, x1:x2] += scores[k]
                count[..., y1:y2, x1:x2] += 1
                group_map[y1:y2, x1:x2] = groups[k] + k * n_groups  # distinct ids per window
            total = total / count
            total = F.interpolate(total, size=(h0, w0), mode="bilinear", align_corners=False)
            labels = total[0].argmax(0).to(torch.uint8).cpu().numpy()
            if not with_groups:
                return labels
            gmap = F.interpolate(group_map[None, None].float(), size=(h0, w0), mode="nearest")
            return labels, gmap[0, 0].long().cpu().numpy()
        finally:
            self.model.train(was_training)


def random_group_labels(
    group_map: np.ndarray, num_classes: int, rng: np.random.Generator
) -> np.ndarray:
    """The random-group baseline: the model's groups, each given a uniformly random class
    (background included)."""
    table = rng.integers(0, num_classes, size=int(group_map.max()) + 1)
    return table[group_map].astype(np.uint8)
