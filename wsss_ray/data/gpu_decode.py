"""GPU-side image decode for ``data.decode_device=cuda``, on the train worker.

With ``decode_device="cuda"`` (``data.decode_device``) the actors do not decode: they read the
JPEG header for the image size, draw the crop box and flip exactly as the CPU path draws them, and
tokenise, emitting ``jpeg`` (the raw bytes), ``crop`` (B x 4 int64: top, left, height, width),
``flip`` (B bool), ``text`` and ``skipped``. The train worker iterates with
:func:`jpeg_collate_fn` and decodes with :func:`decode_crop_batch` (batched nvJPEG through
``torchvision.io.decode_jpeg(device="cuda")``, crop and antialiased resize on the GPU), so the
decode leaves the CPU. Non-JPEG images are re-encoded as JPEG by the actor (rare, slow path).

Why a module of its own: these functions run on the train worker (inside the training step's
``_prepare``), not on the Ray Data decode actors of :mod:`wsss_ray.data.webdataset`, and
inference and evaluation use :func:`normalize_images` without the WebDataset pipeline.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


# ------------------------------------------------------------- decoding on the train worker
def jpeg_collate_fn():
    """``iter_torch_batches(collate_fn=...)`` for the GPU-decode columns: ``jpeg`` becomes a list
    of uint8 CPU tensors (variable length), the other columns CPU tensors; the loop's
    ``_prepare`` decodes and moves them (Ray moves only plain tensor dicts to the device)."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class JpegCollate(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
            return jpeg_batch_tensors(batch)

    return JpegCollate()


def jpeg_batch_tensors(batch: dict[str, Any]) -> dict[str, Any]:
    """The GPU-decode columns as the train worker takes them: ``jpeg`` a list of uint8 CPU
    tensors (variable length), the other columns CPU tensors (what :func:`jpeg_collate_fn`
    does inside Ray)."""
    out: dict[str, Any] = {
        k: torch.as_tensor(np.ascontiguousarray(v)) for k, v in batch.items() if k != "jpeg"
    }
    out["jpeg"] = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in batch["jpeg"]]
    return out


_NVJPEG_FAILED = False


def _nvjpeg_failed(err: Exception) -> None:
    global _NVJPEG_FAILED
    _NVJPEG_FAILED = True
    log.warning("nvJPEG decode failed (%s): decoding on this worker's CPU instead", err)


def decode_crop_batch(
    jpegs: list[torch.Tensor],
    crops_B4: torch.Tensor,
    flips_B: torch.Tensor,
    image_size: int,
    device: torch.device | str = "cuda",
    method: str = "auto",
) -> torch.Tensor:
    """JPEG bytes -> uint8 B x S x S x 3 crops on ``device`` (what the CPU actors deliver):
    ``torchvision.io.decode_jpeg`` (batched nvJPEG on CUDA, libjpeg-turbo on CPU), then per image
    the crop box resized to ``image_size`` and the flip. ``method``: ``loop`` (an antialiased
    bilinear resize per image, as the actors), ``roi_align`` (all crops in one kernel: adaptive
    sampling averages each output pixel's footprint, which is the antialiasing; within 0.3 grey
    levels of ``loop`` on average), ``auto``: ``roi_align`` on CUDA (on an H200, 256 crops by
    ``loop`` cost 28 ms, a third of a vit_s step), ``loop`` elsewhere."""
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    if method == "auto":
        method = "roi_align" if device.type == "cuda" else "loop"
    if method not in ("loop", "roi_align"):
        raise ValueError(f"method must be auto | loop | roi_align, not {method!r}")
    decoded = None
    if device.type == "cuda" and not _NVJPEG_FAILED:
        try:
            # torchvision's nvJPEG decode does not order itself with the current stream: without
            # these two synchronisations the third training step on an H200 read a corrupt batch
            # (NaN in the step; torch 2.11 / torchvision 0.26, decode_crop_batch in _prepare)
            torch.cuda.synchronize(device)
            decoded = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
            torch.cuda.synchronize(device)
        except RuntimeError as err:  # a torchvision without nvJPEG: libjpeg-turbo from now on
            _nvjpeg_failed(err)
    if decoded is None:
        decoded = [decode_jpeg(j, mode=ImageReadMode.RGB).to(device) for j in jpegs]
    if method == "roi_align":
        return _roi_crops(decoded, crops_B4.to(device), flips_B.to(device), image_size)
    from torchvision.transforms.v2 import functional as TF

    boxes = crops_B4.tolist()  # B x 4 ints on the host: one small copy
    flips = flips_B.tolist()
    out = torch.empty(len(decoded), image_size, image_size, 3, dtype=torch.uint8, device=device)
    for b, (img, (top, left, h, w), flip) in enumerate(zip(decoded, boxes, flips)):
        crop = TF.resized_crop(img, top, left, h, w, [image_size, image_size], antialias=True)
        if flip:
            crop = crop.flip(-1)
        out[b] = crop.permute(1, 2, 0)
    return out


def _roi_crops(
    decoded: list[torch.Tensor], crops_B4: torch.Tensor, flips_B: torch.Tensor, size: int
) -> torch.Tensor:
    """The crops of :func:`decode_crop_batch` by ``roi_align``: images padded into float chunks
    of at most ~1 GB, boxes as (index, x1, y1, x2, y2) with pixel-centre alignment."""
    from torchvision.ops import roi_align

    out = torch.empty(len(decoded), 3, size, size, dtype=torch.uint8, device=crops_B4.device)
    c = crops_B4.float()
    height = max(int(d.shape[1]) for d in decoded)
    width = max(int(d.shape[2]) for d in decoded)
    step = max(1, (1 << 30) // (3 * 4 * height * width))  # images per ~1 GB float chunk
    for i in range(0, len(decoded), step):
        chunk = decoded[i : i + step]
        batch = torch.zeros(len(chunk), 3, height, width, device=crops_B4.device)
        for k, d in enumerate(chunk):
            batch[k, :, : d.shape[1], : d.shape[2]] = d
        top, left, h, w = c[i : i + len(chunk)].unbind(1)
        idx = torch.arange(len(chunk), device=c.device, dtype=c.dtype)
        boxes = torch.stack([idx, left, top, left + w, top + h], 1)
        res = roi_align(batch, boxes, (size, size), 1.0, -1, True)
        out[i : i + len(chunk)] = res.round_().clamp_(0, 255).to(torch.uint8)
    out = torch.where(flips_B.view(-1, 1, 1, 1), out.flip(-1), out)
    return out.permute(0, 2, 3, 1).contiguous()


def normalize_images(
    images_BHWC: torch.Tensor,
    mean: list[float],
    std: list[float],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 B x H x W x 3 -> normalised B x 3 x H x W in ``dtype`` (on the images' device)."""
    x = images_BHWC.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return ((x - m) / s).to(dtype)
