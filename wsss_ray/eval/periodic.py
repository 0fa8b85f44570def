"""Validation inside a training run: a small segmentation set held in memory, evaluated on every
worker (each its slice), confusion matrices summed across workers by the training loop.

The driver loads the images once (``load_validation_set``) and ships them with the loop config, so
workers need no shared filesystem; keep the set small (``eval.data.max_images``).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch


def load_validation_set(cfg: Any, output_dir: str | Path) -> dict | None:
    """``{"class_names", "bg_thresh", "samples": [(id, jpeg bytes, mask)]}`` or None when the
    task has no periodic validation configured."""
    ev = getattr(cfg, "eval", None)
    if ev is None or not ev.every:
        return None
    from wsss_ray.data.segmentation import read_mask
    from wsss_ray.eval.datasets import resolve_source

    source = resolve_source(ev.data, output_dir)
    samples = [(r.id, Path(r.image).read_bytes(), read_mask(r.mask)) for r in source.records]
    if not samples:
        raise ValueError(f"eval.data: {source.name} split '{source.split}' has no images")
    zs = getattr(ev, "zero_shot", None)
    bg = zs.bg_thresh if zs is not None and zs.bg_thresh >= 0 else source.bg_thresh
    print(
        f"[wsss_ray] validation every {ev.every} steps on {len(samples)} {source.name} "
        f"{source.split} images",
        flush=True,
    )
    return {
        "class_names": source.class_names,
        "bg_thresh": bg,
        "samples": samples,
        "dataset": source.name,
    }


def build_validator(
    cfg: Any, val: dict, spec: Any = None
) -> Callable[[torch.nn.Module, int, int], np.ndarray]:
    """``validate(task, rank, world) -> local confusion matrix``: the task's registry
    ``validator`` hook."""
    from wsss_ray.tasks.registry import spec_for

    spec = spec or spec_for(cfg)
    if not spec.has("validator"):
        raise ValueError(f"no periodic validation for task '{spec.name}'")
    return spec.hook("validator")(cfg, val)


def zero_shot_validator(cfg: Any, val: dict) -> Callable[[torch.nn.Module, int, int], np.ndarray]:
    """PGSeg: zero-shot segmentation of the validation images with the model in training."""
    from PIL import Image

    from wsss_ray.eval.miou import confusion_matrix
    from wsss_ray.eval.pgseg import segmenter_for

    names = val["class_names"]

    def validate(task: torch.nn.Module, rank: int, world: int) -> np.ndarray:
        device = next(task.parameters()).device
        seg = segmenter_for(
            task.model,
            cfg.model.size,
            names,
            cfg.eval.zero_shot,
            val["bg_thresh"],
            device,
            mean=list(cfg.data.mean),
            std=list(cfg.data.std),
            dataset=val.get("dataset", ""),
        )
        conf = np.zeros((len(names), len(names)), np.int64)
        for _key, jpeg, mask in val["samples"][rank::world]:
            image = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
            conf += confusion_matrix(seg.predict(image), mask, len(names))
        return conf

    return validate


def decoder_validator(cfg: Any, val: dict) -> Callable[[torch.nn.Module, int, int], np.ndarray]:
    """Decoder mIoU on the validation images (scales/flip of ``eval.test``), in eval mode."""
    from PIL import Image

    from wsss_ray.data.gpu_decode import normalize_images
    from wsss_ray.eval.miou import confusion_matrix
    from wsss_ray.tasks.vpl import predict_probs

    names = val["class_names"]
    t = cfg.eval.test

    def validate(task: torch.nn.Module, rank: int, world: int) -> np.ndarray:
        device = next(task.decoder.parameters()).device
        was_training = task.decoder.training
        task.decoder.eval()
        conf = np.zeros((len(names), len(names)), np.int64)
        try:
            for _key, jpeg, mask in val["samples"][rank::world]:
                image = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
                x = normalize_images(
                    torch.from_numpy(image.copy())[None].to(device), cfg.data.mean, cfg.data.std
                )
                task.dense.to(device)
                probs = predict_probs(
                    task.dense, task.decoder, x, list(t.scales), t.flip, t.protocol, t.long_side
                )
                conf += confusion_matrix(probs.argmax(0).cpu().numpy(), mask, len(names))
        finally:
            task.decoder.train(was_training)
        return conf

    return validate
