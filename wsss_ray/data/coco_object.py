"""COCO-Object as GroupViT / PGSeg evaluate it: COCO val2017 (5,000 images), the 80 thing
classes + background, with stuff and unlabeled pixels as background.

The reference builds its ground truth from COCO-Stuff-164k's ``stuffthingmaps_trainval2017``
PNGs (``convert_dataset/convert_coco_object.py``): a pixel holds its COCO category id - 1; thing
values 0..89 map to 1..80 in ascending category-id order, stuff (91..181) and unlabeled (255)
to 0. There is no ignore label, and crowd regions keep their class (COCO-Stuff paints them as
things). Two inputs give that mask here:
- ``stuffthingmaps`` (the reference's): ``<root>/stuffthingmaps_trainval2017/val2017/*.png`` as
  the official archive unpacks, or mmseg's ``<root>/annotations/val2017/*.png``;
- ``instances`` (when that is what the user has): ``<root>/annotations/instances_val2017.json``
  rasterised with pycocotools, crowd annotations painted with their class like the others, in
  file order (where instances overlap, COCO-Stuff's own rasterisation may pick another one).
Images come from ``<root>/val2017/`` or ``<root>/images/val2017/``.

The converted masks (grey PNG, 0..80) are written once into ``<root>/wsss_semantic/
coco_object_val2017/`` (or ``cache_dir``) with a ``DONE.json`` index tied to the input's size and
modification time, each PNG under a temporary name then renamed, like ``wsss_ray.data.coco``. The
COCO 2014 reader (``kind: coco``) is a different set: it stays its own kind.

Bad input is handled as in ``wsss_ray.data.coco``: a json that is not COCO instances, or an
annotation of a category that is not one of the 80 things, is a ``DatasetError`` naming the file
and the annotation; a map or json image whose JPEG is missing is an error naming it; a map that
does not read or has another size than its JPEG, and annotations that cannot be drawn, are left
out and named (``SegSource.skipped`` / ``skipped_annotations``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from wsss_ray.data.coco import (
    COCO_CLASSES,
    _image_problem,
    _read_json,
    _write_json,
    build_masks,
    load_instances,
)
from wsss_ray.data.segmentation import SegRecord, SegSource, encode_mask, warn_skipped

#: COCO's 80 thing category ids, ascending (ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 unused)
THING_IDS = [
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
    31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55,
    56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
    85, 86, 87, 88, 89, 90,
]  # fmt: skip

CACHE_VERSION = 1
SOURCES = ("auto", "stuffthingmaps", "instances")


def stuffthing_lut() -> np.ndarray:
    """256-entry map from a stuffthingmaps pixel (category id - 1; 255 unlabeled) to 0..80."""
    lut = np.zeros(256, np.uint8)
    for label, cat in enumerate(THING_IDS, start=1):
        lut[cat - 1] = label
    return lut


def from_stuffthingmap(mask: np.ndarray) -> np.ndarray:
    """COCO-Object labels of one stuffthingmaps PNG (as ``convert_coco_object.py``)."""
    return stuffthing_lut()[mask]


def _first_dir(*candidates: Path) -> Path | None:
    return next((c for c in candidates if c.is_dir()), None)


def _fingerprint(path: Path) -> dict:
    """The json's size and mtime; a maps folder's PNG count and newest mtime."""
    if path.is_dir():
        pngs = [p.stat().st_mtime_ns for p in path.glob("*.png") if "TrainIds" not in p.name]
        return {"path": str(path.resolve()), "files": len(pngs), "mtime_ns": max(pngs, default=0)}
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def coco_object_source(
    root: str | Path,
    split: str = "val",
    source: str = "auto",
    cache_dir: str | Path | None = None,
) -> SegSource:
    """COCO-Object ``split`` (val: val2017) under ``root``; ``source`` picks the ground truth
    (auto: stuffthingmaps when present, else the instances json)."""
    if source not in SOURCES:
        raise ValueError(f"coco_object source {source!r}: one of {', '.join(SOURCES)}")
    root = Path(root)
    name = f"{split}2017"
    images = _first_dir(root / name, root / "images" / name)
    if images is None:
        raise FileNotFoundError(f"COCO-Object: no image folder {root / name} or images/{name}")
    maps = _first_dir(root / "stuffthingmaps_trainval2017" / name, root / "annotations" / name)
    ann_file = root / "annotations" / f"instances_{name}.json"
    cache = Path(cache_dir) if cache_dir else root / "wsss_semantic" / f"coco_object_{name}"
    index = _read_json(cache / "DONE.json")
    if (
        maps is None
        and not ann_file.is_file()
        and index is not None
        and index.get("version") == CACHE_VERSION
        and source in ("auto", index.get("source"))
    ):  # converted before, the inputs since removed: the cache is the dataset
        return _source(root, split, index, images, cache)
    if source == "auto":
        source = "stuffthingmaps" if maps is not None else "instances"
    if source == "stuffthingmaps" and maps is None:
        raise FileNotFoundError(
            f"COCO-Object: no stuffthingmaps folder {root}/stuffthingmaps_trainval2017/{name} "
            f"or annotations/{name} (from stuffthingmaps_trainval2017.zip)"
        )
    if source == "instances" and not ann_file.is_file():
        raise FileNotFoundError(f"COCO-Object: annotation file not found: {ann_file}")
    origin = maps if source == "stuffthingmaps" else ann_file
    started = {"version": CACHE_VERSION, "source": source, "fingerprint": _fingerprint(origin)}
    if index is None or {k: index.get(k) for k in started} != started:
        index = _convert(source, origin, images, cache, started)
    return _source(root, split, index, images, cache)


def _source(root: Path, split: str, index: dict, images: Path, cache: Path) -> SegSource:
    from wsss_ray.data.segmentation import class_names_override

    records = [
        SegRecord(Path(f).stem, str(images / f), str(cache / f"{Path(f).stem}.png"))
        for f in index["files"]
    ]
    names = class_names_override(root, COCO_CLASSES)
    skipped, anns = list(index.get("skipped", [])), list(index.get("skipped_annotations", []))
    warn_skipped(f"COCO-Object {split}", len(records) + len(skipped), skipped, anns)
    return SegSource(
        "coco_object",
        split,
        names,
        records,
        bg_thresh=0.85,
        skipped=skipped,
        skipped_annotations=anns,
    )


def _convert(source: str, origin: Path, images: Path, cache: Path, started: dict) -> dict:
    """The masks of ``origin`` into ``cache``; returns the ``DONE.json`` index. A map or json
    entry whose JPEG is missing is an error naming it; an unreadable map, one of another size
    than its JPEG, and the annotations :func:`~wsss_ray.data.coco.build_masks` cannot draw are
    left out and named (``skipped``, ``skipped_annotations`` in the index)."""
    from PIL import Image
    from tqdm import tqdm

    doc = load_instances(origin, categories=False) if source == "instances" else None
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "DONE.json").unlink(missing_ok=True)
    files: list[str] = []
    skipped: list[str] = []
    skipped_anns: list[str] = []
    if source == "stuffthingmaps":
        lut = stuffthing_lut()
        pngs = sorted(p for p in origin.glob("*.png") if "TrainIds" not in p.name)
        for png in tqdm(pngs, desc=f"COCO-Object masks -> {cache}", unit="img"):
            stem = png.name.split(".")[0]
            jpg = images / f"{stem}.jpg"
            if not jpg.is_file():
                raise FileNotFoundError(f"COCO-Object: {png.name} has no image {jpg}")
            try:
                with Image.open(png) as im:
                    mask = np.asarray(im)
            except Exception as err:  # noqa: BLE001 - an unreadable map: left out, named
                skipped.append(f"{stem} ({png}): unreadable map ({type(err).__name__}: {err})")
                continue
            if mask.ndim != 2:
                why = f"the map is not a grey PNG (shape {mask.shape})"
            else:
                why = _image_problem(jpg, mask.shape[1], mask.shape[0], "the map's")
            if why:
                skipped.append(f"{stem} ({png}): {why}")
                continue
            _write(cache, stem, lut[mask])
            files.append(jpg.name)
    else:
        cat_to_label = {cat: i for i, cat in enumerate(THING_IDS, start=1)}
        files, skipped, skipped_anns = build_masks(
            doc,
            origin,
            cat_to_label,
            lambda stem, mask: _write(cache, stem, mask),
            images=images,
            crowd=None,  # crowd keeps its class, as COCO-Stuff paints it
            unknown="which is not one of COCO's 80 thing categories (COCO-Object)",
            desc=f"COCO-Object masks -> {cache}",
        )
    index = {**started, "files": files, "skipped": skipped, "skipped_annotations": skipped_anns}
    _write_json(cache / "DONE.json", index)
    return index


def _write(cache: Path, stem: str, mask: np.ndarray) -> None:
    tmp = cache / f".{stem}.png.tmp"
    tmp.write_bytes(encode_mask(mask.astype(np.uint8)))
    os.replace(tmp, cache / f"{stem}.png")
