"""Segmentation data, zero-shot inference and batch-inference sections (shared by the PGSeg and
VPL evaluation jobs and the periodic validation of training runs)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from wsss_ray.config.base import _f, need

SEG_KINDS = ("voc", "coco", "coco_object", "context")


@dataclass
class SyntheticSegConfig:
    num_train: int = _f(64, "synthetic VOC-layout train images (when data.root is '')")
    num_val: int = _f(48, "synthetic VOC-layout val images")
    image_size: int = _f(128, "side of the generated images")
    seed: int = _f(1, "generator seed (1: disjoint from the pretraining shards' seed 0)")


@dataclass
class SegDataConfig:
    kind: str = _f(
        "voc",
        "voc | coco (COCO 2014, 80 classes, crowd = ignore) | coco_object (val2017 as GroupViT/"
        "PGSeg: COCO-Stuff things, stuff = background) | context",
    )
    root: str = _f(
        "",
        "VOC2012 / COCO 2014 / COCO 2017 (coco_object) / VOC2010 (Context) folder; '' = "
        "synthetic VOC layout",
    )
    split: str = _f(
        "val",
        "split (voc: train, val, train_aug; coco: train, val; coco_object: val; context: val)",
    )
    gt: str = _f(
        "auto",
        "coco_object ground truth: stuffthingmaps (the reference's) | instances "
        "(instances_val2017.json) | auto (stuffthingmaps when present)",
    )
    max_images: int = _f(0, "use the first N images of the split (0 = all)")
    synthetic: SyntheticSegConfig = field(default_factory=SyntheticSegConfig)

    def check(self, key: str) -> None:
        need(self.kind in SEG_KINDS, f"{key}.kind", f"one of {', '.join(SEG_KINDS)}")
        need(
            not self.root or os.path.isdir(self.root), f"{key}.root", f"no such folder: {self.root}"
        )
        need(self.max_images >= 0, f"{key}.max_images", "must be >= 0")
        need(
            self.gt in ("auto", "stuffthingmaps", "instances"),
            f"{key}.gt",
            "auto | stuffthingmaps | instances",
        )
        need(
            bool(self.root) or self.kind == "voc",
            f"{key}.root",
            "synthetic data is VOC layout only",
        )


@dataclass
class ZeroShotConfig:
    templates: list[str] = _f(["a photo of a {}."], "prompt templates, averaged per class")
    class_names: str = _f(
        "reference",
        "class names in the prompts: reference (GroupViT/PGSeg's: VOC table, plant, monitor; "
        "Context airplane, plant, monitor) | readable (dining table, potted plant, tv monitor)",
    )
    topk: int = _f(5, "restrict each image to its top-k classes by the pooled embedding (0 = off)")
    bg_thresh: float = _f(
        -1.0, "background threshold; < 0 = dataset default (VOC .95 COCO .85 Context .36)"
    )
    mean: list[float] = _f(
        [],
        "normalisation mean (RGB); [] = the model's training statistics: the run's data.mean in "
        "periodic validation, ImageNet's (GroupViT/PGSeg) in the eval job",
    )
    std: list[float] = _f([], "normalisation std (RGB); [] as for mean")
    short_side: int = _f(448, "resize the short side to this before sliding")
    max_long_side: int = _f(
        2048,
        "... unless the long side would exceed this (mmseg's img_scale (2048, 448); 0 = no cap)",
    )
    window: int = _f(448, "sliding window side")
    stride: int = _f(224, "sliding window stride")

    def check(self, key: str) -> None:
        need(
            all("{}" in t for t in self.templates) and bool(self.templates),
            f"{key}.templates",
            "every template needs a {} for the class name",
        )
        need(
            self.window > 0 and 0 < self.stride <= self.window,
            f"{key}.stride",
            "0 < stride <= window",
        )
        need(self.short_side > 0, f"{key}.short_side", "must be > 0")
        need(self.topk >= 0, f"{key}.topk", "must be >= 0")
        need(
            self.class_names in ("reference", "readable"),
            f"{key}.class_names",
            "reference | readable",
        )
        need(
            len(self.mean) == len(self.std) and len(self.mean) in (0, 3),
            f"{key}.mean",
            "mean and std need 3 values each (or both [])",
        )


@dataclass
class InferenceConfig:
    actors: list[int] = _f([1, 2], "inference actor pool size (min, max)")
    cpus_per_actor: float = _f(1.0, "logical CPUs per inference actor")
    gpus_per_actor: float = _f(-1.0, "GPUs per actor; < 0 = 1 when the cluster has GPUs, else 0")
    batch_size: int = _f(8, "images per map_batches call")

    def check(self) -> None:
        need(
            len(self.actors) == 2 and 1 <= self.actors[0] <= self.actors[1],
            "infer.actors",
            "needs (min, max) with 1 <= min <= max",
        )
        need(self.batch_size > 0, "infer.batch_size", "must be > 0")


@dataclass
class PeriodicEvalConfig:
    every: int = _f(0, "zero-shot validation every N steps and at the end (0 = off)")
    data: SegDataConfig = field(default_factory=lambda: SegDataConfig(max_images=32))
    zero_shot: ZeroShotConfig = field(default_factory=ZeroShotConfig)

    def check(self) -> None:
        need(self.every >= 0, "eval.every", "must be >= 0")
        if self.every:
            self.data.check("eval.data")
            self.zero_shot.check("eval.zero_shot")
