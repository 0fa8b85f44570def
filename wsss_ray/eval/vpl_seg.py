"""Evaluation of a VPL phase-2 decoder (``jobs/eval_vpl.py``) as Ray Data batch inference.

An actor pool (a GPU per actor when the cluster has them) holds the frozen CLIP and the trained
decoder; each image is predicted at the test scales (default 1 and 0.75) with and without a
horizontal flip, the softmax probabilities averaged, optionally refined by a dense CRF, and its
confusion matrix summed. The driver writes the per-class table, ``results.json`` and overlays
under ``<output_dir>/<run.name>/`` and logs them to MLflow.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsss_ray.config import VPLEvalConfig
from wsss_ray.eval.collect import collect, finish_eval, open_eval, pack_rows, predicted


def load_decoder(checkpoint: str, dense, num_classes: int, dec) -> torch.nn.Module:
    """The trained decoder of a ``jobs/train_vpl.py`` run folder, checkpoint folder or .pt."""
    from wsss_ray.eval.checkpoint import load_state_dict
    from wsss_ray.tasks.vpl import build_decoder

    decoder = build_decoder(dense, num_classes, dec)
    state = load_state_dict(checkpoint, prefix="decoder.")
    own = decoder.state_dict()
    bad = sorted(set(own) ^ set(state)) + [
        k for k in own if k in state and state[k].shape != own[k].shape
    ]
    if bad:
        raise ValueError(
            f"checkpoint {checkpoint} does not fit this decoder (e.g. {bad[:3]}): are "
            "decoder.* and clip.name the ones it was trained with, and the dataset the same?"
        )
    decoder.load_state_dict(state)
    return decoder.eval()


class SegPredictor:
    """The Ray Data actor: one call = one batch of (id, JPEG, mask) rows -> summed confusion."""

    def __init__(self, cfg: VPLEvalConfig, class_names: list[str], overlay_ids: list[str]):
        from wsss_ray.tasks.vpl import load_dense_clip

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dense = load_dense_clip(cfg.clip.name, cfg.clip.weights, cfg.clip.origin).to(
            self.device
        )
        self.decoder = load_decoder(cfg.checkpoint, self.dense, len(class_names), cfg.decoder).to(
            self.device
        )
        self.cfg = cfg
        self.num_classes = len(class_names)
        self.overlay_ids = set(overlay_ids)

    def predict(self, image: np.ndarray) -> np.ndarray:
        from wsss_ray.config import CLIP_MEAN, CLIP_STD
        from wsss_ray.data.gpu_decode import normalize_images
        from wsss_ray.tasks.vpl import predict_probs

        t = self.cfg.test
        x = normalize_images(
            torch.from_numpy(image.copy())[None].to(self.device), CLIP_MEAN, CLIP_STD
        )
        probs = predict_probs(
            self.dense, self.decoder, x, list(t.scales), t.flip, t.protocol, t.long_side
        )
        if t.crf:
            from wsss_ray.ops.crf import dense_crf

            return dense_crf(image, probs.cpu().numpy()).argmax(0).astype(np.uint8)
        return probs.argmax(0).cpu().numpy().astype(np.uint8)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from PIL import Image

        from wsss_ray.data.segmentation import decode_mask_bytes
        from wsss_ray.eval.miou import confusion_matrix
        from wsss_ray.eval.pgseg import overlay_png

        c = self.num_classes
        conf = np.zeros((c, c), np.int64)
        ov_ids, ov_png = [], []
        for key, img_bytes, mask_bytes in zip(batch["id"], batch["image"], batch["mask"]):
            key = str(key)
            image = np.asarray(Image.open(io.BytesIO(img_bytes)).convert("RGB"))
            gt = decode_mask_bytes(mask_bytes)
            pred = self.predict(image)
            conf += confusion_matrix(pred, gt, c)
            if key in self.overlay_ids:
                ov_ids.append(key)
                ov_png.append(overlay_png(image, gt, pred))
        return pack_rows(conf, len(batch["id"]), ov_ids, ov_png)


def run(cfg: VPLEvalConfig) -> dict[str, Any]:
    """Evaluate the decoder on ``cfg.data``; returns the metrics (mIoU, per-class IoU)."""

    from wsss_ray.eval.miou import iou_from_confusion

    cfg.clip.weights = str(Path(cfg.clip.weights).resolve())
    cfg.checkpoint = str(Path(cfg.checkpoint).resolve())
    run = open_eval(cfg)
    source = run.source
    n_img = len(source.records)
    t = cfg.test
    print(
        f"[wsss_ray] VPL decoder on {source.name} {source.split}: {n_img} images, scales "
        f"{list(t.scales)}{' + flip' if t.flip else ''}{' + CRF' if t.crf else ''}, "
        f"checkpoint {cfg.checkpoint}",
        flush=True,
    )
    args = (cfg, source.class_names, run.overlay_ids)
    ds = predicted(source, SegPredictor, args, cfg.infer, cfg.ray.num_cpus)
    c = len(source.class_names)
    total, done, overlays, elapsed = collect(ds, n_img, (c, c))

    result = iou_from_confusion(total, source.class_names)
    floor = iou_from_confusion(_all_background(total))
    line = (
        f"[wsss_ray] mIoU {100 * result.miou:.1f} (all background {100 * floor.miou:.1f}) | "
        f"{done} images in {elapsed:.1f}s"
    )
    baselines = {"all_background": floor.miou}
    return finish_eval(cfg, run, result, baselines, done, elapsed, overlays, line)


def _all_background(conf: np.ndarray) -> np.ndarray:
    """The confusion matrix of predicting background everywhere, from a model's matrix (same
    ground-truth pixel counts per class, all in column 0)."""
    out = np.zeros_like(conf)
    out[:, 0] = conf.sum(1)
    return out
