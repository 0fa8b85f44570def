"""CLIP-ES class-aware attention-based affinity (CAA) refinement of CAMs (METHODS.md 2.1).

GradCAM seeds from CLIP are blobby and miss object extent; CLIP's own patch-to-patch
attention says which patches belong together. CLIP-ES turns the attention of the last blocks
into a transition matrix (alternate column/row normalisation, symmetrise, square once) and
propagates each class's CAM through it, restricted (per class) to the bounding boxes of the
CAM's confident regions so that the affinity cannot leak activation into far-away objects.

CLIP-ES finds the boxes with cv2 contours on a uint8 map; here scipy.ndimage labels the
8-connected components of ``cam > thresh * max`` on the float map and takes each one's
bounding box (inclusive of its last row and column). Pure PyTorch/numpy/scipy; no Ray.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from wsss_ray.ops.cam import minmax_normalise

_TINY = 1e-12  # guards a zero row/column sum; attention from a softmax has none


def attention_transition(attn: torch.Tensor, n_iter: int = 3) -> torch.Tensor:
    """N x N transition matrix from patch attention ``L x N x N`` (or ``N x N``).

    Layers are averaged; then ``n_iter`` pairs of (column, row) normalisation, ``(T + T^T) / 2``
    and ``T @ T``. Row i of the attention is query patch i (class token already removed, heads
    already averaged). Computed in float32 at least.
    """
    if attn.dim() == 3:
        a = attn.mean(0)
    elif attn.dim() == 2:
        a = attn
    else:
        raise ValueError(f"want L x N x N or N x N attention, got {tuple(attn.shape)}")
    if a.shape[0] != a.shape[1]:
        raise ValueError(f"attention is not square: {tuple(a.shape)}")
    if n_iter < 1:
        raise ValueError("n_iter must be >= 1")
    t = a.detach().to(torch.promote_types(a.dtype, torch.float32))
    for _ in range(n_iter):
        t = t / t.sum(0, keepdim=True).clamp_min(_TINY)
        t = t / t.sum(1, keepdim=True).clamp_min(_TINY)
    t = (t + t.T) / 2
    return t @ t


def box_mask(cam: np.ndarray | torch.Tensor, thresh: float) -> torch.Tensor:
    """Flat (h*w) float mask: 1 inside the bounding box of every 8-connected component of
    ``cam > thresh * cam.max()``, else 0. On the CAM's device when given a tensor."""
    device = cam.device if isinstance(cam, torch.Tensor) else torch.device("cpu")
    arr = cam.detach().float().cpu().numpy() if isinstance(cam, torch.Tensor) else np.asarray(cam)
    if arr.ndim != 2:
        raise ValueError(f"want an h x w map, got shape {arr.shape}")
    mask = np.zeros(arr.shape, dtype=np.float32)
    if arr.size and arr.max() > 0:
        comps, _ = ndimage.label(arr > thresh * arr.max(), structure=np.ones((3, 3), dtype=bool))
        for box in ndimage.find_objects(comps):
            if box is not None:
                mask[box] = 1.0
    return torch.from_numpy(mask.reshape(-1)).to(device)


def caa_refine(cam: torch.Tensor, trans: torch.Tensor, box_thresh: float = 0.4) -> torch.Tensor:
    """Refined CAMs ``K x h x w`` in [0, 1] (detached, float32).

    For each map k: ``(trans * box_mask(cam_k)[None, :]) @ vec(cam_k)``, min-max normalised, as
    in CLIP-ES (``trans_mat * aff_mask``). Masking the columns of ``trans`` equals masking the
    CAM vector, so all K maps go through one matmul. ``box_thresh``: 0.4 VOC, 0.7 COCO.
    """
    if cam.dim() != 3:
        raise ValueError(f"want K x h x w CAMs, got {tuple(cam.shape)}")
    k, h, w = cam.shape
    if trans.shape != (h * w, h * w):
        raise ValueError(f"transition {tuple(trans.shape)} does not match a {h} x {w} grid")
    c = cam.detach().float()
    if k == 0:
        return c.clone()
    masks = torch.stack([box_mask(c[i], box_thresh) for i in range(k)]).to(c.device)  # K x N
    v = masks * c.reshape(k, h * w)  # K x N
    refined = v @ trans.detach().to(device=c.device, dtype=torch.float32).T  # (trans @ v_k)^T
    return minmax_normalise(refined.reshape(k, h, w), (-2, -1))


def rfm_attention(attn: torch.Tensor, seg_affinity: torch.Tensor) -> torch.Tensor:
    """WeCLIP's refinement module (RFM): N x N attention for CAA from the CLIP blocks' patch
    attention ``attn`` (L x N x N, the last L blocks) and the decoder's affinity (N x N). A
    block is kept when ``sum(seg_affinity - attn_l)`` is at most the mean of that sum over the
    L blocks; the kept blocks are averaged and multiplied elementwise by the affinity. Feed the
    result to :func:`attention_transition`."""
    if attn.dim() != 3 or attn.shape[1:] != seg_affinity.shape:
        raise ValueError(f"want L x N x N attention and N x N affinity, got {attn.shape}")
    a, s = attn.detach().float(), seg_affinity.detach().float()
    diff = (s[None] - a).flatten(1).sum(1)  # L
    keep = (diff <= diff.mean()).float().view(-1, 1, 1)
    return (keep * a).sum(0) / (keep.sum(0) + 1e-5) * s
