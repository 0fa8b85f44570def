"""COCO 2014 as semantic segmentation (COCO-Object: 80 classes + background) via pycocotools.

``annotations/instances_{split}2014.json`` (polygons, compressed and uncompressed RLE,
``iscrowd``) become one grey PNG per image: category ids sorted ascending map to 1..K, background
is 0, annotations are painted in file order and crowd regions are 255 (ignore). Parsing the
train json takes minutes and rasterising 82k images longer, so the PNGs are written **once** into
a cache folder (default ``<root>/wsss_semantic/{split}2014``) with a ``DONE.json`` index; later
calls read the index and never parse the annotation file again (it may even be deleted).

The cache is tied to the annotation file by its size and modification time: a changed file
rebuilds every mask. Each PNG is written under a temporary name and renamed, and a
``CONVERTING.json`` stamp records which file a conversion started from, so an interrupted
conversion of the same file resumes (finished PNGs are skipped) and never leaves a half-written
mask that looks whole.
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

CACHE_VERSION = 2


def semantic_mask(
    coco, image_id: int, cat_to_label: dict[int, int], crowd: int | None = 255
) -> np.ndarray:
    """The 0..K mask of one image: annotations painted in file order, crowd regions ``crowd``
    (255, ignore; None: their class, as COCO-Object). ``annToMask`` handles polygons,
    compressed RLE (string counts) and uncompressed RLE."""
    info = coco.imgs[image_id]
    out = np.zeros((info["height"], info["width"]), np.uint8)
    for ann in coco.imgToAnns[image_id]:
        m = coco.annToMask(ann).astype(bool)
        is_crowd = ann.get("iscrowd", 0) and crowd is not None
        out[m] = crowd if is_crowd else cat_to_label[ann["category_id"]]
    return out


def _fingerprint(ann_file: Path) -> dict:
    st = ann_file.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def coco_source(
    root: str | Path, split: str = "val", cache_dir: str | Path | None = None
) -> SegSource:
    """COCO ``split`` (``train`` | ``val``) of the 2014 layout under ``root``: ``{split}2014/``
    images and ``annotations/instances_{split}2014.json``. Builds the semantic PNG cache on the
    first call (``cache_dir`` or ``<root>/wsss_semantic/{split}2014``) and reuses it after."""
    root = Path(root)
    images = root / f"{split}2014"
    ann_file = root / "annotations" / f"instances_{split}2014.json"
    cache = Path(cache_dir) if cache_dir else root / "wsss_semantic" / f"{split}2014"
    index = _read_json(cache / "DONE.json")
    fresh = index is not None and index.get("version") == CACHE_VERSION
    if fresh and ann_file.is_file():
        fresh = index.get("fingerprint") == _fingerprint(ann_file)
    if not fresh and not ann_file.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {ann_file}")
    if not images.is_dir():
        raise FileNotFoundError(f"COCO image folder not found: {images}")
    if not fresh:
        index = convert(ann_file, cache)
    return _source(split, index, images, cache)


def convert(ann_file: Path, cache: Path, progress: bool = True) -> dict:
    """Write every image's semantic PNG into ``cache`` and return the index that ``DONE.json``
    records. Finished PNGs are skipped only when resuming a conversion of the same file."""
    from pycocotools.coco import COCO
    from tqdm import tqdm

    cache.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(ann_file)
    started = {"version": CACHE_VERSION, "fingerprint": fingerprint}
    (cache / "DONE.json").unlink(missing_ok=True)
    resume = _read_json(cache / "CONVERTING.json") == started
    _write_json(cache / "CONVERTING.json", started)

    coco = COCO(str(ann_file))
    cats = sorted(coco.cats)
    cat_to_label = {cid: i + 1 for i, cid in enumerate(cats)}
    names = ["background", *[coco.cats[c]["name"] for c in cats]]
    files = []
    for image_id in tqdm(
        sorted(coco.imgs), desc=f"COCO masks -> {cache}", unit="img", disable=not progress
    ):
        file_name = coco.imgs[image_id]["file_name"]
        files.append(file_name)
        stem = Path(file_name).stem
        target = cache / f"{stem}.png"
        if resume and target.is_file():
            continue
        tmp = cache / f".{stem}.png.tmp"
        tmp.write_bytes(encode_mask(semantic_mask(coco, image_id, cat_to_label)))
        os.replace(tmp, target)
    index = {
        **started,
        "annotations": str(ann_file.resolve()),
        "class_names": names,
        "category_ids": cats,
        "files": files,
    }
    _write_json(cache / "DONE.json", index)
    (cache / "CONVERTING.json").unlink(missing_ok=True)
    return index


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def _source(split: str, index: dict, images: Path, cache: Path) -> SegSource:
    records = [
        SegRecord(Path(f).stem, str(images / f), str(cache / f"{Path(f).stem}.png"))
        for f in index["files"]
    ]
    return SegSource("coco", split, list(index["class_names"]), records, bg_thresh=0.85)
