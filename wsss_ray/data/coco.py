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

Bad input (:func:`load_instances`, :func:`build_masks`): a file that is not JSON, not a JSON object,
or lacks the ``images`` / ``annotations`` / ``categories`` lists, an image entry without an integer
id, a file name and a positive size, or an annotation whose ``category_id`` the file does not
define, is a :class:`~wsss_ray.data.segmentation.DatasetError` naming the file (and the annotation),
raised before any mask is written: an annotation of an unknown class cannot be given a label, and
painting it as background would silently change the ground truth every mIoU is measured against, so
the file must be fixed. A listed JPEG that is missing is a FileNotFoundError naming it (as for VOC).
Everything else is left out and named, the rest of the split used: an image whose JPEG header is
unreadable or of another size than the json says (its mask would not fit the picture); an annotation
with an empty segmentation, no polygon of 3 or more points, an RLE of another size than its image or
one that does not decode, or an ``image_id`` that is not in ``images``. The names are kept in
``DONE.json`` and reported as ``SegSource.skipped`` / ``skipped_annotations`` (and a warning) on
every open.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from wsss_ray.data.segmentation import (
    DatasetError,
    SegRecord,
    SegSource,
    encode_mask,
    warn_skipped,
)

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


def _short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _size(value: Any) -> int | None:
    """A positive integer (``640`` or ``640.0``), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value) if value > 0 and int(value) == value else None


def load_instances(ann_file: Path, categories: bool = True) -> dict:
    """The instances json of ``ann_file``, checked: an object with ``images``, ``annotations``
    (and, with ``categories``, ``categories``) lists; every image with an integer ``id``, a
    ``file_name`` and positive ``width`` / ``height`` (made ints); every annotation an object with
    an ``image_id`` and a ``category_id``; every category with an integer ``id`` and a ``name``.
    :class:`DatasetError` naming the file and the first bad entry otherwise."""
    try:
        doc = json.loads(Path(ann_file).read_bytes())
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise DatasetError(f"{ann_file}: not JSON ({err})") from None
    if not isinstance(doc, dict):
        raise DatasetError(
            f"{ann_file}: not a COCO instances file (a JSON {type(doc).__name__}, not an object)"
        )
    for key in ("images", "annotations", "categories") if categories else ("images", "annotations"):
        if not isinstance(doc.get(key), list):
            raise DatasetError(f"{ann_file}: not a COCO instances file: no '{key}' list")
    for i, im in enumerate(doc["images"]):
        ok = isinstance(im, dict) and isinstance(im.get("id"), int)
        ok = ok and isinstance(im.get("file_name"), str) and bool(im["file_name"])
        width, height = (_size(im.get(k)) if ok else None for k in ("width", "height"))
        if not (ok and width and height):
            raise DatasetError(
                f"{ann_file}: images[{i}] needs an integer id, a file_name and a positive width "
                f"and height: {_short(im)}"
            )
        im["width"], im["height"] = width, height
    for i, ann in enumerate(doc["annotations"]):
        if not (isinstance(ann, dict) and "image_id" in ann and "category_id" in ann):
            raise DatasetError(
                f"{ann_file}: annotations[{i}] needs an image_id and a category_id: {_short(ann)}"
            )
    for i, cat in enumerate(doc.get("categories") or []):
        if not (isinstance(cat, dict) and isinstance(cat.get("id"), int) and "name" in cat):
            raise DatasetError(
                f"{ann_file}: categories[{i}] needs an integer id and a name: {_short(cat)}"
            )
    return doc


def annotation_mask(ann: dict, height: int, width: int) -> np.ndarray:
    """The ``height`` x ``width`` bool mask of one annotation: polygons, compressed RLE (string
    counts) or uncompressed RLE, as pycocotools' ``annToMask`` draws them. Polygons of fewer than
    3 points have no area and are dropped. ValueError saying why when nothing can be drawn: an
    empty segmentation, no polygon of 3 or more points, an RLE of another size than the image,
    one that does not decode."""
    from pycocotools import mask as mask_utils

    seg = ann.get("segmentation")
    if not seg:
        raise ValueError("empty segmentation")
    if isinstance(seg, list):
        polygons = [p for p in seg if isinstance(p, list) and len(p) >= 6]
        if any(not isinstance(v, int | float) for p in polygons for v in p):
            raise ValueError("a polygon with coordinates that are not numbers")
        if not polygons:
            raise ValueError(f"no polygon of 3 or more points ({_short(seg, 60)})")
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
        size = list(seg["size"]) if isinstance(seg["size"], list | tuple) else seg["size"]
        if size != [height, width]:
            raise ValueError(f"RLE size {size} differs from the image's [{height}, {width}]")
        counts = seg["counts"]
        if isinstance(counts, list):
            rle = mask_utils.frPyObjects(seg, height, width)  # uncompressed RLE
        elif isinstance(counts, str | bytes):
            rle = seg
        else:
            raise ValueError("RLE counts neither a list nor a string")
    else:
        raise ValueError(f"a segmentation neither polygons nor RLE ({_short(seg, 60)})")
    try:
        mask = mask_utils.decode(rle)
    except Exception as err:  # noqa: BLE001 - pycocotools: "Invalid RLE mask representation"...
        raise ValueError(f"undecodable RLE ({err})") from None
    return mask.astype(bool)


def _image_problem(path: Path, width: int, height: int, what: str = "the json's") -> str:
    """Why the JPEG at ``path`` cannot go with a ``width`` x ``height`` mask ("" when it can):
    an unreadable header or another size. Only the header is read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            size = im.size
    except Exception as err:  # noqa: BLE001 - any unreadable header
        return f"unreadable image ({type(err).__name__}: {err})"
    if size != (width, height):
        return f"image {size[0]} x {size[1]} differs from {what} {width} x {height}"
    return ""


def build_masks(
    doc: dict,
    ann_file: Path,
    cat_to_label: dict[int, int],
    write: Callable[[str, np.ndarray], None],
    images: Path | None = None,
    crowd: int | None = 255,
    unknown: str = "which is not in the file's categories",
    done: Callable[[str], bool] | None = None,
    progress: bool = True,
    desc: str = "COCO masks",
) -> tuple[list[str], list[str], list[str]]:
    """Rasterise a checked instances json (:func:`load_instances`): for each image in id order,
    its annotations painted in file order (``cat_to_label``; crowd regions ``crowd``, None: their
    class) into an H x W mask handed to ``write(stem, mask)``. ``done(stem)``: already written
    (a resumed conversion). Returns (the file names of the images kept, the images left out, the
    annotations left out), each left-out one named with why. Raised before any mask is written:
    :class:`DatasetError` for an annotation whose category is not in ``cat_to_label``
    (``unknown`` says why), FileNotFoundError for an image missing from ``images``."""
    from tqdm import tqdm

    by_id = {im["id"]: im for im in doc["images"]}
    per_image: dict[int, list[tuple[Any, dict]]] = {}
    skipped_anns: list[str] = []
    for i, ann in enumerate(doc["annotations"]):
        ann_id, image_id = ann.get("id", f"#{i}"), ann["image_id"]
        if ann["category_id"] not in cat_to_label:
            raise DatasetError(
                f"{ann_file}: annotation {ann_id} (image {image_id}) has category_id "
                f"{ann['category_id']}, {unknown}"
            )
        if image_id not in by_id:
            skipped_anns.append(f"annotation {ann_id}: image_id {image_id} is not in 'images'")
            continue
        per_image.setdefault(image_id, []).append((ann_id, ann))
    if images is not None:  # a listed image that is missing: an error, as for VOC
        for image_id in sorted(by_id):
            path = images / by_id[image_id]["file_name"]
            if not path.is_file():
                raise FileNotFoundError(
                    f"{ann_file}: image {image_id} is listed but {path} is missing"
                )
    files: list[str] = []
    skipped: list[str] = []
    for image_id in tqdm(sorted(by_id), desc=desc, unit="img", disable=not progress):
        info = by_id[image_id]
        name, height, width = info["file_name"], info["height"], info["width"]
        stem = Path(name).stem
        if images is not None:
            why = _image_problem(images / name, width, height)
            if why:
                skipped.append(f"{stem} (image {image_id}, {images / name}): {why}")
                continue
        files.append(name)
        resumed = done is not None and done(stem)
        out = None if resumed else np.zeros((height, width), np.uint8)
        for ann_id, ann in per_image.get(image_id, []):
            try:
                m = annotation_mask(ann, height, width)
            except ValueError as err:
                skipped_anns.append(f"annotation {ann_id} (image {image_id}, {name}): {err}")
                continue
            if out is not None:
                is_crowd = ann.get("iscrowd", 0) and crowd is not None
                out[m] = crowd if is_crowd else cat_to_label[ann["category_id"]]
        if out is not None:
            write(stem, out)
    return files, skipped, skipped_anns


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
        index = convert(ann_file, cache, images=images)
    return _source(split, index, images, cache)


def convert(ann_file: Path, cache: Path, progress: bool = True, images: Path | None = None) -> dict:
    """Write every image's semantic PNG into ``cache`` and return the index that ``DONE.json``
    records. Finished PNGs are skipped only when resuming a conversion of the same file.
    ``images``: the JPEG folder, to leave out images that are missing or of another size than
    the json says. :class:`DatasetError` for a file that is not a COCO instances json, before
    the cache is touched."""
    doc = load_instances(ann_file)
    cats = sorted({c["id"] for c in doc["categories"]})
    cat_to_label = {cid: i + 1 for i, cid in enumerate(cats)}
    name_of = {c["id"]: str(c["name"]) for c in doc["categories"]}
    names = ["background", *[name_of[c] for c in cats]]

    cache.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(ann_file)
    started = {"version": CACHE_VERSION, "fingerprint": fingerprint}
    (cache / "DONE.json").unlink(missing_ok=True)
    resume = _read_json(cache / "CONVERTING.json") == started
    _write_json(cache / "CONVERTING.json", started)

    def write(stem: str, mask: np.ndarray) -> None:
        tmp = cache / f".{stem}.png.tmp"
        tmp.write_bytes(encode_mask(mask))
        os.replace(tmp, cache / f"{stem}.png")

    files, skipped, skipped_anns = build_masks(
        doc,
        ann_file,
        cat_to_label,
        write,
        images=images,
        done=(lambda stem: (cache / f"{stem}.png").is_file()) if resume else None,
        progress=progress,
        desc=f"COCO masks -> {cache}",
    )
    index = {
        **started,
        "annotations": str(ann_file.resolve()),
        "class_names": names,
        "category_ids": cats,
        "files": files,
        "skipped": skipped,
        "skipped_annotations": skipped_anns,
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
    skipped, anns = list(index.get("skipped", [])), list(index.get("skipped_annotations", []))
    warn_skipped(f"COCO {split}", len(records) + len(skipped), skipped, anns)
    return SegSource(
        "coco",
        split,
        list(index["class_names"]),
        records,
        bg_thresh=0.85,
        skipped=skipped,
        skipped_annotations=anns,
    )
