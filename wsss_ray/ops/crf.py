"""Pseudo-labels from CAMs: background score, optional dense CRF, confidence filter
(METHODS.md 2.1).

CLIP-ES turns foreground CAMs into a label map by scoring background as
``(1 - max_k CAM_k)^alpha`` and taking the argmax; optionally the stacked scores go through a
fully connected CRF (Krähenbühl; 10 iterations, Gaussian w3 xy1, bilateral w4 xy67 rgb3) and
pixels whose posterior maximum is below 0.95 become ``255`` (ignored by the segmentation loss).

The CRF needs the ``pydensecrf`` module (the ``pydensecrf2`` distribution builds it on current
Python/Cython; the old ``pydensecrf`` 1.0rc3 sdist does not), installed with
``pip install wsss_ray[crf]``. It is imported lazily, so everything else here works without it.
Pure numpy/PyTorch; no Ray.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

CRF_EXTRA_HINT = (
    "dense CRF needs pydensecrf: pip install wsss_ray[crf] (or pip install pydensecrf2)"
)


def crf_available() -> bool:
    """True when ``pydensecrf.densecrf`` imports."""
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def _numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def dense_crf(
    image: np.ndarray,
    probs: np.ndarray,
    n_iter: int = 10,
    pos_w: float = 3,
    pos_xy: float = 1,
    bi_w: float = 4,
    bi_xy: float = 67,
    bi_rgb: float = 3,
) -> np.ndarray:
    """CRF posterior ``K x H x W`` (float32, sums to 1 over K) for ``image`` (H x W x 3 uint8)
    and class scores ``probs`` (K x H x W; unary = -log(clip(probs, 1e-5, 1)) as pydensecrf's
    ``unary_from_softmax``, so unnormalised scores such as stacked CAMs are accepted, as CLIP-ES
    does). Raises ImportError naming the ``crf`` extra when pydensecrf is missing."""
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as e:
        raise ImportError(CRF_EXTRA_HINT) from e
    probs = _numpy(probs)
    image = np.asarray(image)
    if probs.ndim != 3:
        raise ValueError(f"want K x H x W scores, got shape {probs.shape}")
    k, h, w = probs.shape
    if image.shape != (h, w, 3) or image.dtype != np.uint8:
        raise ValueError(f"want an {h} x {w} x 3 uint8 image, got {image.shape} {image.dtype}")
    unary = np.ascontiguousarray(-np.log(np.clip(probs, 1e-5, 1.0)).reshape(k, -1), np.float32)
    d = dcrf.DenseCRF2D(w, h, k)
    d.setUnaryEnergy(unary)
    d.addPairwiseGaussian(sxy=pos_xy, compat=pos_w)
    d.addPairwiseBilateral(sxy=bi_xy, srgb=bi_rgb, rgbim=np.ascontiguousarray(image), compat=bi_w)
    q = d.inference(n_iter)
    return np.asarray(q, dtype=np.float32).reshape(k, h, w)


#: CLIP-ES's CRF mean (BGR, the Caffe ImageNet mean; ``eval_cam_with_crf.py``)
CLIP_ES_MEAN_BGR = (104.008, 116.669, 122.675)

#: ``cam.crf_input`` choices
CRF_INPUTS = ("rgb", "clip_es")


def crf_image(image: np.ndarray, mode: str = "rgb") -> np.ndarray:
    """The H x W x 3 uint8 image the CRF's bilateral term sees. ``rgb``: the image itself.
    ``clip_es``: what CLIP-ES passes (``eval_cam_with_crf.py``): the BGR image minus
    :data:`CLIP_ES_MEAN_BGR`, cast to uint8, so negative values wrap around (-3.7 -> 253); the
    cast is written out (truncate, then modulo 256) because a negative float to uint8 cast is
    undefined in C and numpy inherits the platform's result."""
    if mode == "rgb":
        return np.ascontiguousarray(image)
    if mode != "clip_es":
        raise ValueError(f"crf input: one of {', '.join(CRF_INPUTS)} (got {mode!r})")
    bgr = np.asarray(image)[..., ::-1].astype(np.float32) - np.float32(CLIP_ES_MEAN_BGR)
    return np.ascontiguousarray((np.trunc(bgr).astype(np.int64) % 256).astype(np.uint8))


def confidence_filter(
    probs: np.ndarray | torch.Tensor,
    thresh: float = 0.95,
    ignore: int = 255,
    class_ids: Sequence[int] | None = None,
) -> np.ndarray:
    """H x W uint8 labels: argmax over K of ``probs`` (K x H x W), ``ignore`` where the maximum
    is below ``thresh``. With ``class_ids`` (length K) plane k is written as ``class_ids[k]``
    (e.g. ``[0, *labels]`` after :func:`stack_background`); otherwise as k."""
    p = _numpy(probs)
    if p.ndim != 3:
        raise ValueError(f"want K x H x W probabilities, got shape {p.shape}")
    idx = p.argmax(0)
    out = idx if class_ids is None else _lookup(class_ids, p.shape[0])[idx]
    out = out.astype(np.uint8)
    out[p.max(0) < thresh] = ignore
    return out


def stack_background(cams: np.ndarray | torch.Tensor, alpha: float = 1.0) -> np.ndarray:
    """``(K+1) x H x W`` float32 scores: ``(1 - max_k cams)^alpha`` in front of the K
    foreground CAMs (in [0, 1]). The input of :func:`dense_crf` in CLIP-ES."""
    c = _numpy(cams).astype(np.float32, copy=False)
    if c.ndim != 3:
        raise ValueError(f"want K x H x W CAMs, got shape {c.shape}")
    peak = c.max(0, keepdims=True) if c.shape[0] else np.zeros((1, *c.shape[1:]), np.float32)
    bg = np.power(np.clip(1.0 - peak, 0.0, None), alpha)
    return np.concatenate([bg, c], 0)


def pseudo_label(
    cams: np.ndarray | torch.Tensor, labels: Sequence[int], alpha: float = 1.0
) -> np.ndarray:
    """H x W uint8 label map from K foreground CAMs (K x H x W in [0, 1]) of the classes
    ``labels`` (K class ids, background = 0 excluded): argmax of :func:`stack_background`,
    index 0 -> 0 and index k+1 -> ``labels[k]``. Ties go to the background, then to the
    earlier class."""
    scores = stack_background(cams, alpha)
    ids = _lookup([0, *labels], scores.shape[0])
    if np.any(ids[1:] == 0):
        raise ValueError("class id 0 is the background; labels must name foreground classes")
    return ids[scores.argmax(0)].astype(np.uint8)


def _lookup(class_ids: Sequence[int], k: int) -> np.ndarray:
    ids = np.asarray(list(class_ids), dtype=np.int64)
    if ids.shape != (k,):
        raise ValueError(f"{len(ids)} class ids for {k} maps")
    if ids.size and (ids.min() < 0 or ids.max() > 254):
        raise ValueError("class ids must lie in [0, 254] (255 is the ignore label)")
    return ids
