"""COCO 2014 as semantic segmentation (COCO-Object: 80 classes + background) via pycocotools.

``annotations/instances_{split}2014.json`` (polygons, compressed and uncompressed RLE,
``iscrowd``) become one grey PNG per image: category ids sorted ascending map to 1..K, background
is 0, annotations are painted in file order and crowd regions are 255 (ignore). The PNGs are
written **once** into a cache folder (default ``<root>/wsss_semantic/{split}2014``) with a
``DONE.json`` index; later calls read the index and never parse the annotation file again. Each
PNG is written under a temporary name and renamed, so an interrupted conversion resumes where it
stopped and never leaves a half-written mask that looks whole.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from wsss_ray.data.segmentation import SegRecord, SegSource, encode_mask

COCO_CLASSES = [
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck",
    "boat", "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
]  # fmt: skip

CACHE_VERSION = 1


def semantic_mask(coco, image_id: int, cat_to_label: dict[int, int]) -> np.ndarray:
    """The 0..K mask of one image: annotations painted in file order, crowd regions 255."""
    info = coco.imgs[image_id]
    out = np.zeros((info["height"], info["width"]), np.uint8)
    for ann in coco.imgToAnns[image_id]:
        m = coco.annToMask(ann).astype(bool)
        out[m] = 255 if ann.get("iscrowd", 0) else cat_to_label[ann["category_id"]]
    return out


def coco_source(
    root: str | Path, split: str = "val", cache_dir: str | Path | None = None
) -> SegSource:
    root = Path(root)
    images = root / f"{split}2014"
    ann_file = root / "annotations" / f"instances_{split}2014.json"
    cache = Path(cache_dir) if cache_dir else root / "wsss_semantic" / f"{split}2014"
    done = cache / "DONE.json"
    if done.is_file():
        index = json.loads(done.read_text())
        if index.get("version") == CACHE_VERSION and index.get("annotations") == str(ann_file):
            return _source(split, index, images, cache)
    if not ann_file.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {ann_file}")
    if not images.is_dir():
        raise FileNotFoundError(f"COCO image folder not found: {images}")
    index = convert(ann_file, cache)
    return _source(split, index, images, cache)


def convert(ann_file: Path, cache: Path) -> dict:
    """Write every image's semantic PNG into ``cache`` (skipping finished ones); return the
    index that ``DONE.json`` records."""
    from pycocotools.coco import COCO
    from tqdm import tqdm

    cache.mkdir(parents=True, exist_ok=True)
    coco = COCO(str(ann_file))
    cats = sorted(coco.cats)
    cat_to_label = {cid: i + 1 for i, cid in enumerate(cats)}
    names = ["background", *[coco.cats[c]["name"] for c in cats]]
    files = []
    for image_id in tqdm(sorted(coco.imgs), desc=f"COCO masks -> {cache}", mininterval=2):
        stem = Path(coco.imgs[image_id]["file_name"]).stem
        target = cache / f"{stem}.png"
        files.append(coco.imgs[image_id]["file_name"])
        if target.is_file():
            continue
        tmp = cache / f".{stem}.png.tmp"
        tmp.write_bytes(encode_mask(semantic_mask(coco, image_id, cat_to_label)))
        os.replace(tmp, target)
    index = {
        "version": CACHE_VERSION,
        "annotations": str(ann_file),
        "class_names": names,
        "category_ids": cats,
        "files": files,
    }
    (cache / "DONE.json").write_text(json.dumps(index))
    return index


def _source(split: str, index: dict, images: Path, cache: Path) -> SegSource:
    records = [
        SegRecord(Path(f).stem, str(images / f), str(cache / f"{Path(f).stem}.png"))
        for f in index["files"]
    ]
    return SegSource("coco", split, list(index["class_names"]), records, bg_thresh=0.85)
