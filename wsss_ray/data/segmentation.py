"""Segmentation datasets behind one interface: VOC 2012 (+ SBD train_aug), COCO 2014 (semantic
masks built once from the instance annotations) and Pascal Context.

Every reader returns a :class:`SegSource`: the class names (index 0 = background), a default
zero-shot background threshold, and records of (id, JPEG path, mask PNG path) where the mask
holds class indices with 255 = ignore. Image-level labels are always derived from the masks.
``segmentation_dataset`` turns a source into a Ray Dataset of (id, image bytes, mask bytes,
labels); ``read_segmentation_shards`` reads the same columns back from WebDataset tars written by
``jobs/make_shards.py --segmentation``, so evaluation data can stream like the pretraining data.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

KINDS = ("voc", "coco", "context")


@dataclass(frozen=True)
class SegRecord:
    id: str
    image: str  # JPEG path
    mask: str  # PNG of class indices (palette or grey), 255 = ignore


@dataclass
class SegSource:
    name: str
    split: str
    class_names: list[str]
    records: list[SegRecord] = field(default_factory=list)
    bg_thresh: float = 0.95


def read_mask(path: str | Path) -> np.ndarray:
    """H x W uint8 class indices. Palette PNGs are read as their indices, never as RGB."""
    with Image.open(path) as im:
        if im.mode not in ("P", "L"):
            raise ValueError(f"{path}: mask PNG must be palette or grey, not {im.mode}")
        return np.array(im, dtype=np.uint8)


def decode_mask_bytes(data: bytes) -> np.ndarray:
    return read_mask(io.BytesIO(data))


def encode_mask(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def image_labels(mask: np.ndarray) -> list[int]:
    """Sorted classes present in the mask, without background (0) and ignore (255)."""
    return [int(v) for v in np.unique(mask) if v not in (0, 255)]


def class_names_override(root: Path, default: list[str]) -> list[str]:
    """``class_names.txt`` in a dataset root (the synthetic writers leave one) wins."""
    f = root / "class_names.txt"
    if f.is_file():
        return [line.strip() for line in f.read_text().splitlines() if line.strip()]
    return list(default)


def read_split(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def open_source(kind: str, root: str | Path, split: str, **kwargs) -> SegSource:
    """The reader for ``kind`` (voc | coco | context) on ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root not found: {root}")
    if kind == "voc":
        from wsss_ray.data.voc import voc_source

        return voc_source(root, split, **kwargs)
    if kind == "coco":
        from wsss_ray.data.coco import coco_source

        return coco_source(root, split, **kwargs)
    if kind == "context":
        from wsss_ray.data.context import context_source

        return context_source(root, split, **kwargs)
    raise ValueError(f"unknown dataset kind '{kind}' (known: {', '.join(KINDS)})")


def _load_rows(batch: dict) -> dict:
    images, masks, labels = [], [], []
    for img_path, mask_path in zip(batch["image_path"], batch["mask_path"]):
        images.append(Path(img_path).read_bytes())
        mask_bytes = Path(mask_path).read_bytes()
        masks.append(mask_bytes)
        labels.append(json.dumps(image_labels(decode_mask_bytes(mask_bytes))))
    return {
        "id": batch["id"],
        "image": np.array(images, dtype=object),
        "mask": np.array(masks, dtype=object),
        "labels": np.array(labels, dtype=object),
    }


def segmentation_dataset(source: SegSource, limit: int | None = None):
    """Ray Dataset of ``id``, ``image`` (JPEG bytes), ``mask`` (PNG bytes), ``labels`` (JSON list
    of present classes). Files are read by Ray tasks: on a multi-node cluster the paths must be on
    storage every node sees (or shard the set with ``make_shards.py --segmentation``)."""
    import ray.data

    records = source.records[:limit] if limit else source.records
    items = [{"id": r.id, "image_path": r.image, "mask_path": r.mask} for r in records]
    return ray.data.from_items(items).map_batches(_load_rows, batch_format="numpy", batch_size=16)


def _shard_rows(batch: dict) -> dict:
    out: dict[str, list] = {"id": [], "image": [], "mask": [], "labels": []}
    n = len(batch["__key__"])
    cols = {k: batch[k] if k in batch else [None] * n for k in ("jpg", "png", "json")}
    for i in range(n):
        jpg, png, meta = cols["jpg"][i], cols["png"][i], cols["json"][i]
        if jpg is None or png is None:
            continue
        info = json.loads(meta) if meta is not None else {}
        out["id"].append(info.get("id", str(batch["__key__"][i])))
        out["image"].append(bytes(jpg))
        out["mask"].append(bytes(png))
        out["labels"].append(json.dumps(image_labels(decode_mask_bytes(bytes(png)))))
    return {k: np.array(v, dtype=object) for k, v in out.items()}


def read_segmentation_shards(paths: list[str]):
    """The same columns as :func:`segmentation_dataset`, from ``make_shards.py --segmentation``
    tars (``{key}.jpg``, ``{key}.png``, ``{key}.json``); decoding happens in ``map_batches``."""
    from wsss_ray.data.webdataset import read_shards

    return read_shards(paths, shuffle_files=False).map_batches(
        _shard_rows, batch_format="numpy", batch_size=16
    )


def write_segmentation_shards(
    source: SegSource, out_dir: str | Path, samples_per_shard: int = 1000, prefix: str = "seg"
) -> list[str]:
    """Shard a source: ``{key}.jpg`` (the original bytes), ``{key}.png`` (grey class-index mask),
    ``{key}.json`` (id, labels, dataset, split). ``class_names.txt`` is written beside them."""
    import webdataset as wds
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "class_names.txt").write_text("\n".join(source.class_names) + "\n")
    paths: list[str] = []
    records = source.records
    for start in range(0, len(records), samples_per_shard):
        final = out_dir / f"{prefix}-{len(paths):06d}.tar"
        tmp = final.with_suffix(".tar.tmp")
        with wds.TarWriter(str(tmp), mtime=0.0) as sink:
            chunk = records[start : start + samples_per_shard]
            for r in tqdm(chunk, desc=final.name, leave=False):
                mask = read_mask(r.mask)
                meta = {
                    "id": r.id,
                    "labels": image_labels(mask),
                    "dataset": source.name,
                    "split": source.split,
                }
                sink.write(
                    {
                        "__key__": r.id,
                        "jpg": Path(r.image).read_bytes(),
                        "png": encode_mask(mask),
                        "json": json.dumps(meta).encode(),
                    }
                )
        tmp.replace(final)
        paths.append(str(final))
    return paths
