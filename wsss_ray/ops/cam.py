"""Softmax-GradCAM seeds in the CLIP-ES style (METHODS.md 2.1), independent of the model.

CLIP-ES takes the GradCAM target to be one class's *softmax* probability over the present
classes plus a set of background prompts, so a class's map is pushed away from both the other
classes and the background. The hooked layer is the last transformer block's ``ln_1``; for
each target class the channel weights are the mean over patch tokens of the gradient of that
probability, and the CAM is ``ReLU(sum_c w_c A_c)``, min-max normalised per map.

The caller hands in the patch-token activations (class token removed) that are part of the
graph that produced the logits, so this module needs no hooks and knows nothing about CLIP.
Pure PyTorch; no Ray.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# pytorch_grad_cam (used by CLIP-ES) divides by (max + 1e-7). GradCAM maps are often tiny in
# absolute terms (gradients of a probability, averaged over ~1000 tokens), so an additive eps
# leaves their peak visibly below 1 and makes the scale depend on p_t. Dividing by
# max(range, eps) keeps every non-degenerate map's peak at exactly 1 and a constant one at 0.
EPS = 1e-12


def minmax_normalise(x: torch.Tensor, dims: int | Sequence[int], eps: float = EPS) -> torch.Tensor:
    """``(x - min) / max(max - min, eps)`` with min and max taken over ``dims``.

    A constant map (in particular an all-zero one) comes out all zero.
    """
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    x = x - x.amin(dim=dims, keepdim=True)
    return x / x.amax(dim=dims, keepdim=True).clamp_min(eps)


def softmax_gradcam(
    activations: torch.Tensor,
    logits: torch.Tensor,
    targets: Sequence[int],
    grid: tuple[int, int],
    retain_graph: bool = False,
) -> torch.Tensor:
    """CAMs ``B x len(targets) x h x w`` in [0, 1], detached.

    ``activations``: B x N x C patch tokens (N = h * w, row-major over ``grid = (h, w)``) in the
    autograd graph of ``logits`` (B x K). ``targets`` index the K columns; the other columns
    (background prompts, other classes) stay in the softmax. One ``autograd.grad`` per target;
    the graph is freed after the last one unless ``retain_graph``.
    """
    if activations.dim() != 3 or logits.dim() != 2:
        raise ValueError(
            f"want activations B x N x C and logits B x K, got {tuple(activations.shape)} "
            f"and {tuple(logits.shape)}"
        )
    b, n, _ = activations.shape
    h, w = grid
    if n != h * w:
        raise ValueError(f"{n} tokens do not fill a {h} x {w} grid")
    if logits.shape[0] != b:
        raise ValueError(f"batch mismatch: activations {b}, logits {logits.shape[0]}")
    if not logits.requires_grad:
        raise ValueError("logits carry no graph (computed under torch.no_grad()?)")
    targets = [int(t) for t in targets]
    for t in targets:
        if not 0 <= t < logits.shape[1]:
            raise IndexError(f"target {t} outside the {logits.shape[1]} logits")
    if not targets:
        return activations.new_zeros(b, 0, h, w, dtype=torch.float32)

    probs = logits.float().softmax(-1)
    acts = activations.detach().float()
    cams = []
    for i, t in enumerate(targets):
        keep = retain_graph or i < len(targets) - 1
        (grad,) = torch.autograd.grad(probs[:, t].sum(), activations, retain_graph=keep)
        weights = grad.float().mean(1)  # B x C: spatial mean of the gradients
        cams.append(torch.einsum("bnc,bc->bn", acts, weights).relu())
    cam = torch.stack(cams, 1).reshape(b, len(targets), h, w)
    return minmax_normalise(cam, (-2, -1))


def upsample_cams(cams: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``... x h x w`` maps to ``size = (H, W)``, then min-max per map.

    Accepts h x w, K x h x w or B x K x h x w and keeps the leading dimensions.
    """
    if cams.dim() < 2:
        raise ValueError(f"want at least h x w, got {tuple(cams.shape)}")
    lead = cams.shape[:-2]
    x = cams.float().reshape(-1, 1, *cams.shape[-2:])
    x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    x = x.reshape(*lead, *x.shape[-2:])
    return minmax_normalise(x, (-2, -1))
