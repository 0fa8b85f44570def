"""PGSeg zero-shot segmentation evaluation as Ray Data batch inference (``jobs/eval_pgseg.py``).

Rows (id, JPEG bytes, mask PNG bytes) flow into an actor pool that holds the model (one GPU per
actor when the cluster has GPUs); each actor call returns the summed confusion matrices of its
batch (the model, and two trivial baselines: all background, and the model's own groups with
random class labels) plus overlays for a few chosen images. The driver streams these rows,
sums the matrices, prints progress, and writes the per-class table, ``results.json`` and the
overlays under ``<output_dir>/<run.name>/``, and logs all of it to MLflow.
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsss_ray.config import PGSegEvalConfig, ZeroShotConfig
from wsss_ray.eval.collect import collect, finish_eval, open_eval, pack_rows, predicted

KINDS = ("model", "all_background", "random_groups")


def build_model(size: str, checkpoint: str, text_act: str = "quick_gelu") -> torch.nn.Module:
    """A PGSeg of ``size`` with the weights of ``checkpoint`` ('' = untrained) in eval mode.
    ``checkpoint``: our run folder, checkpoint folder or .pt, or a released GroupViT / PGSeg
    ``.pth``; the model's optional parts (NPR, text prototypes) follow what it holds."""
    from wsss_ray.eval.checkpoint import load_state_dict
    from wsss_ray.models.pgseg import PGSeg, load_for_inference

    if not checkpoint:
        return PGSeg(size, text_act=text_act).eval()
    model, _ = load_for_inference(size, load_state_dict(checkpoint), text_act, checkpoint)
    return model


def segmenter_for(
    model: torch.nn.Module,
    size: str,
    class_names: list[str],
    zs: ZeroShotConfig,
    bg_thresh: float,
    device: str | torch.device = "cpu",
    mean: list[float] | None = None,
    std: list[float] | None = None,
    dataset: str = "",
):
    """The zero-shot segmenter of ``zs``. Normalisation: ``zs.mean/std`` when given, else
    ``mean/std`` (periodic validation passes the run's ``data.mean/std``), else ImageNet's.
    Prompt names: ``zs.class_names`` (reference | readable) for ``dataset`` (a source kind)."""
    from wsss_ray.config import IMAGENET_MEAN, IMAGENET_STD
    from wsss_ray.eval.zero_shot import ZeroShotSegmenter, prompt_class_names
    from wsss_ray.models.clip import tokenizer
    from wsss_ray.models.pgseg import SIZES

    tok = tokenizer("ViT-B-16", SIZES[size].context_length)
    return ZeroShotSegmenter(
        model,
        class_names,
        tok,
        list(zs.templates),
        zs.topk,
        bg_thresh,
        zs.short_side,
        zs.max_long_side,
        zs.window,
        zs.stride,
        mean=list(zs.mean) or list(mean or IMAGENET_MEAN),
        std=list(zs.std) or list(std or IMAGENET_STD),
        device=device,
        prompt_names=prompt_class_names(dataset, class_names, zs.class_names),
    )


def overlay_png(image: np.ndarray, gt: np.ndarray, pred: np.ndarray) -> bytes:
    """image | ground truth | prediction, side by side, masks in the VOC palette."""
    from PIL import Image

    from wsss_ray.data.synthetic import voc_palette

    pal = np.array(voc_palette(), np.uint8).reshape(256, 3)
    pal[255] = (224, 224, 192)  # VOC's boundary colour
    panel = np.concatenate([image, pal[gt], pal[pred]], axis=1)
    buf = io.BytesIO()
    Image.fromarray(panel).save(buf, format="PNG")
    return buf.getvalue()


class ZeroShotPredictor:
    """The Ray Data actor: holds the model; one call = one batch of images."""

    def __init__(
        self,
        size: str,
        checkpoint: str,
        class_names: list[str],
        zs: ZeroShotConfig,
        bg_thresh: float,
        overlay_ids: list[str],
        seed: int,
        text_act: str = "quick_gelu",
        dataset: str = "",
    ):
        torch.set_num_threads(max(torch.get_num_threads(), 1))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        model = build_model(size, checkpoint, text_act).to(self.device)
        self.seg = segmenter_for(
            model, size, class_names, zs, bg_thresh, self.device, dataset=dataset
        )
        self.num_classes = len(class_names)
        self.overlay_ids = set(overlay_ids)
        self.seed = seed

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from PIL import Image

        from wsss_ray.data.segmentation import decode_mask_bytes
        from wsss_ray.eval.miou import confusion_matrix
        from wsss_ray.eval.zero_shot import random_group_labels

        c = self.num_classes
        conf = np.zeros((len(KINDS), c, c), np.int64)
        ov_ids, ov_png = [], []
        for key, img_bytes, mask_bytes in zip(batch["id"], batch["image"], batch["mask"]):
            key = str(key)
            image = np.asarray(Image.open(io.BytesIO(img_bytes)).convert("RGB"))
            gt = decode_mask_bytes(mask_bytes)
            pred, groups = self.seg.predict(image, with_groups=True)
            rng = np.random.default_rng([self.seed, zlib.crc32(key.encode())])
            conf[0] += confusion_matrix(pred, gt, c)
            conf[1] += confusion_matrix(np.zeros_like(gt), gt, c)
            conf[2] += confusion_matrix(random_group_labels(groups, c, rng), gt, c)
            if key in self.overlay_ids:
                ov_ids.append(key)
                ov_png.append(overlay_png(image, gt, pred))
        return pack_rows(conf, len(batch["id"]), ov_ids, ov_png)


def run(cfg: PGSegEvalConfig) -> dict[str, Any]:
    """Evaluate; returns the metrics (model mIoU, per-class IoU, baselines)."""

    from wsss_ray.eval.miou import iou_from_confusion

    run = open_eval(cfg)
    source, overlay_ids = run.source, run.overlay_ids
    bg = cfg.zero_shot.bg_thresh if cfg.zero_shot.bg_thresh >= 0 else source.bg_thresh
    n_img = len(source.records)
    print(
        f"[wsss_ray] zero-shot {source.name} {source.split}: {n_img} images, "
        f"{len(source.class_names)} classes, bg_thresh {bg}, checkpoint "
        f"{cfg.model.checkpoint or '(untrained model)'}",
        flush=True,
    )

    checkpoint = cfg.model.checkpoint and str(Path(cfg.model.checkpoint).resolve())
    if checkpoint:  # a checkpoint that does not fit fails here, before Ray starts
        from wsss_ray.console import library_output

        with library_output():  # DeepSpeed's ZeRO merge prints: to console.log
            build_model(cfg.model.size, checkpoint, cfg.model.text_act)
    args = (
        cfg.model.size,
        checkpoint,
        source.class_names,
        cfg.zero_shot,
        bg,
        overlay_ids,
        cfg.seed,
        cfg.model.text_act,
        source.name,
    )
    ds = predicted(source, ZeroShotPredictor, args, cfg.infer, cfg.ray.num_cpus)
    c = len(source.class_names)
    total, done, overlays, elapsed = collect(ds, n_img, (len(KINDS), c, c))

    results = {k: iou_from_confusion(total[i], source.class_names) for i, k in enumerate(KINDS)}
    model = results["model"]
    line = (
        f"[wsss_ray] mIoU {100 * model.miou:.1f} | baselines: all background "
        f"{100 * results['all_background'].miou:.1f}, random group labels "
        f"{100 * results['random_groups'].miou:.1f} | {done} images in {elapsed:.1f}s"
    )
    baselines = {k: results[k].miou for k in KINDS[1:]}
    return finish_eval(cfg, run, model, baselines, done, elapsed, overlays, line)
