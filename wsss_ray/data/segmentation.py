"""Segmentation datasets behind one interface: VOC 2012 (+ SBD train_aug), COCO 2014 (semantic
masks built once from the instance annotations) and Pascal Context.

Every reader returns a :class:`SegSource`: the class names (index 0 = background), a default
zero-shot background threshold, and records of (id, JPEG path, mask PNG path) where the mask
holds class indices with 255 = ignore. Image-level labels are always derived from the masks, never
from a side list, so they cannot disagree with the pixels. ``segmentation_dataset`` turns a source
into a Ray Dataset of (id, image bytes, mask bytes, labels); ``read_segmentation_shards`` reads the
same columns back from WebDataset tars written by ``jobs/make_shards.py --segmentation``, so
evaluation data can stream from object storage like the pretraining data.

Ray is imported only inside the functions that build Ray Datasets: the readers themselves are
plain Python and work without it.

Bad input: an image whose mask has another size (VOC, Context: both headers are compared when the
source is opened, ~80 us a pair; COCO: the JPEG against the json when the masks are built) or
whose image or mask header cannot be read is left out of ``records`` and named in
``SegSource.skipped`` (and a warning). The shard writer decodes every image and mask in full and
skips, counts and names what fails. A dataset file that cannot be used at all (a json that is not
COCO, an annotation of a category the file does not define) raises :class:`DatasetError` naming
the file, which jobs print as one line with exit status 2.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from wsss_ray.errors import UserInputError

if TYPE_CHECKING:  # type hints only: Ray is imported where Datasets are built
    import ray.data

    from wsss_ray.data.shards import ShardSummary

KINDS = ("voc", "coco", "coco_object", "context")
log = logging.getLogger(__name__)


class DatasetError(UserInputError):
    """A dataset file that cannot be used as it is; the message names the file and what to fix
    (jobs print it as one line, exit status 2)."""


@dataclass(frozen=True)
class SegRecord:
    """One image of a split."""

    id: str  # image id / file stem
    image: str  # path to the JPEG
    mask: str  # path to a PNG of class indices (palette or grey), 255 = ignore


@dataclass
class SegSource:
    """A split of a segmentation dataset, as paths (nothing is decoded until asked)."""

    name: str  # "voc" | "coco" | "context"
    split: str
    class_names: list[str]  # index 0 = background
    records: list[SegRecord] = field(default_factory=list)
    bg_thresh: float = 0.95  # zero-shot background threshold default: voc .95 coco .85 ctx .36
    #: images of the split left out of ``records``: ``"<id> (<file>): <why>"``
    skipped: list[str] = field(default_factory=list)
    #: annotations left out of the masks (COCO): ``"annotation <id> (image <id>): <why>"``
    skipped_annotations: list[str] = field(default_factory=list)


#: PNG modes that hold class indices directly. Palette ("P") images are read as their indices,
#: never through the palette; 16/32-bit grey is accepted when every value fits in uint8.
_INDEX_MODES = ("P", "L", "I", "I;16", "I;16B", "I;16L")


def read_mask(path: str | Path | io.BytesIO) -> np.ndarray:
    """H x W uint8 class indices. Palette PNGs are read as their indices, never as RGB."""
    with Image.open(path) as im:
        if im.mode not in _INDEX_MODES:
            raise ValueError(f"{path}: a mask PNG must be palette or grey, not {im.mode}")
        arr = np.array(im)
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(f"{path}: mask values outside 0..255")
        arr = arr.astype(np.uint8)
    return arr


def decode_mask_bytes(data: bytes) -> np.ndarray:
    """PNG bytes (palette or grey) -> H x W uint8 class indices."""
    return read_mask(io.BytesIO(bytes(data)))


def encode_mask(mask: np.ndarray) -> bytes:
    """H x W class indices -> grey PNG bytes (lossless; what the COCO cache and shards hold)."""
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
    """The ids listed in an ``ImageSets`` split file (first column of each line)."""
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def require_files(records: list[SegRecord], dataset: str) -> None:
    """A clear error naming the first missing image or mask of a split (instead of a failure
    deep inside a Ray task later)."""
    for r in records:
        for path in (r.image, r.mask):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{dataset}: {r.id} is listed but {path} is missing")


def _header_size(path: str) -> tuple[int, int]:
    """(width, height) from the file's header; ValueError saying why in a few words."""
    from PIL import UnidentifiedImageError

    if os.path.getsize(path) == 0:
        raise ValueError("empty file (0 bytes)")
    try:
        with Image.open(path) as im:
            return im.size
    except UnidentifiedImageError:
        raise ValueError("not an image PIL can read") from None
    except Exception as err:  # noqa: BLE001 - a header cut short or corrupt
        raise ValueError(f"{type(err).__name__}: {err}") from None


def check_sizes(records: list[SegRecord]) -> tuple[list[SegRecord], list[str]]:
    """(records whose image and mask headers read and agree in size, the others named with
    why). Only headers are read (~80 us a pair), no pixels."""
    kept, skipped = [], []
    for r in records:
        try:
            image = _header_size(r.image)
        except (OSError, ValueError) as err:  # any unreadable header: left out, named
            skipped.append(f"{r.id} ({r.image}): unreadable image ({err})")
            continue
        try:
            mask = _header_size(r.mask)
        except (OSError, ValueError) as err:
            skipped.append(f"{r.id} ({r.mask}): unreadable mask ({err})")
            continue
        if mask != image:
            skipped.append(
                f"{r.id} ({r.mask}): mask {mask[0]} x {mask[1]} differs from image "
                f"{image[0]} x {image[1]}"
            )
            continue
        kept.append(r)
    return kept, skipped


def warn_skipped(
    label: str, total: int, skipped: list[str], annotations: Sequence[str] = ()
) -> None:
    """One warning naming the first images (and annotations) a reader left out."""
    if skipped:
        shown = "; ".join(skipped[:5]) + (
            f"; ... {len(skipped) - 5} more" if len(skipped) > 5 else ""
        )
        log.warning("%s: %d of %d images left out: %s", label, len(skipped), total, shown)
    if annotations:
        more = f"; ... {len(annotations) - 5} more" if len(annotations) > 5 else ""
        log.warning(
            "%s: %d annotations left out of the masks: %s",
            label,
            len(annotations),
            "; ".join(annotations[:5]) + more,
        )


def voc_style_source(
    name: str,
    root: Path,
    split: str,
    mask_folder: str,
    image_sets: str,
    default_classes: list[str],
    bg_thresh: float,
    label: str,
) -> SegSource:
    """A split in the VOC layout under ``root``: ``JPEGImages/<id>.jpg``, ``<mask_folder>/<id>.png``
    and the ids in ``ImageSets/<image_sets>/<split>.txt``; ``label`` names the dataset in errors.
    Raises FileNotFoundError naming the first missing folder, split file, image or mask; an image
    whose mask has another size, or whose header cannot be read, is left out and named
    (``skipped``, and a warning)."""
    mask_dir = root / mask_folder
    for folder in (root / "JPEGImages", mask_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"{label} folder not found: {folder}")
    names = read_split(root / "ImageSets" / image_sets / f"{split}.txt")
    records = [
        SegRecord(n, str(root / "JPEGImages" / f"{n}.jpg"), str(mask_dir / f"{n}.png"))
        for n in names
    ]
    require_files(records, f"{label} {split}")
    kept, skipped = check_sizes(records)
    warn_skipped(f"{label} {split}", len(records), skipped)
    classes = class_names_override(root, default_classes)
    return SegSource(name, split, classes, kept, bg_thresh=bg_thresh, skipped=skipped)


def open_source(kind: str, root: str | Path, split: str, **kwargs) -> SegSource:
    """The reader for ``kind`` (voc | coco | coco_object | context) on ``root``; ``kwargs`` go to
    it (VOC: ``aug``, COCO: ``cache_dir``, COCO-Object: ``source``, ``cache_dir``). Raises
    FileNotFoundError naming a missing root, folder or split file and ValueError for an unknown
    kind."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root not found: {root}")
    if kind == "voc":
        from wsss_ray.data.voc import voc_source

        return voc_source(root, split, **kwargs)
    if kind == "coco":
        from wsss_ray.data.coco import coco_source

        return coco_source(root, split, **kwargs)
    if kind == "coco_object":
        from wsss_ray.data.coco_object import coco_object_source

        return coco_object_source(root, split, **kwargs)
    if kind == "context":
        from wsss_ray.data.context import context_source

        return context_source(root, split, **kwargs)
    raise ValueError(f"unknown dataset kind '{kind}' (known: {', '.join(KINDS)})")


def _rows_table(
    ids: list[str],
    images: list[bytes],
    masks: list[bytes],
    labels: list[list[int]] | None = None,
):
    """The dataset columns as an Arrow table with explicit types (also when empty): ``labels``
    becomes ``list<int64>`` so rows give plain lists and numpy batches give arrays. ``labels``:
    the classes of each mask when the caller decoded them already (else from the masks)."""
    import pyarrow as pa

    if labels is None:
        labels = [image_labels(decode_mask_bytes(m)) for m in masks]
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "image": pa.array(images, pa.binary()),
            "mask": pa.array(masks, pa.binary()),
            "labels": pa.array(labels, pa.list_(pa.int64())),
        }
    )


def _load_rows(batch: dict):
    images = [Path(p).read_bytes() for p in batch["image_path"]]
    masks = [Path(p).read_bytes() for p in batch["mask_path"]]
    return _rows_table([str(i) for i in batch["id"]], images, masks)


def segmentation_dataset(
    source: SegSource, limit: int | None = None, override_num_blocks: int | None = None
) -> ray.data.Dataset:
    """Ray Dataset with columns ``id`` (str), ``image`` (JPEG bytes), ``mask`` (PNG bytes of
    class indices, 255 = ignore) and ``labels`` (list of the classes present in the mask,
    without 0 and 255), in record order.

    The files are read by Ray tasks, wherever they run: on a multi-node cluster the dataset must
    be on storage every node sees (NFS, a shared volume), or shard it first with
    ``jobs/make_shards.py --segmentation`` and use :func:`read_segmentation_shards`.
    ``limit`` keeps the first records; ``override_num_blocks`` sets the read parallelism."""
    import ray.data

    records = source.records[:limit] if limit is not None else source.records
    items = [{"id": r.id, "image_path": r.image, "mask_path": r.mask} for r in records]
    ds = ray.data.from_items(items, override_num_blocks=override_num_blocks)
    return ds.map_batches(_load_rows, batch_format="numpy", batch_size=16)


def _shard_rows(batch: dict):
    """Shard rows -> the dataset columns. A row without its image or mask (the marker of a
    truncated tar, a member missing its pair) or with a mask that does not decode is skipped
    with a warning naming the shard and key."""
    from wsss_ray.data.skips import TRUNCATED_KEY, as_bytes, skip_name

    n = len(batch["__key__"])
    keys = ("__url__", "jpg", "png", "json")
    cols = {k: batch[k] if k in batch else [None] * n for k in keys}
    ids, images, masks, labels = [], [], [], []
    for i in range(n):
        key, url = batch["__key__"][i], cols["__url__"][i]
        jpg, png, meta = (as_bytes(cols[k][i]) for k in ("jpg", "png", "json"))
        if str(key) == TRUNCATED_KEY:
            why = "truncated or corrupt tar: the rest of the shard is skipped"
        elif jpg is None or png is None:
            why = "image without its .png mask" if png is None else "mask without its .jpg"
        else:
            try:
                classes = image_labels(decode_mask_bytes(png))  # the one decode of the mask
                why = ""
            except Exception as err:  # noqa: BLE001 - a bad mask: this sample only
                why = f"unreadable mask ({type(err).__name__}: {err})"
        if why:
            log.warning("segmentation shard sample skipped: %s", skip_name(url, key, why))
            continue
        try:
            info = json.loads(meta) if meta is not None else {}
        except ValueError:
            info = {}
        ids.append(str(info.get("id", key)) if isinstance(info, dict) else str(key))
        images.append(jpg)
        masks.append(png)
        labels.append(classes)
    return _rows_table(ids, images, masks, labels)


def read_segmentation_shards(paths: list[str]) -> ray.data.Dataset:
    """The same columns as :func:`segmentation_dataset`, from ``make_shards.py --segmentation``
    tars (``{key}.jpg``, ``{key}.png``, ``{key}.json``). The read task only streams raw bytes;
    parsing the json and recomputing labels from the mask happen in ``map_batches``. A truncated
    tar keeps the samples before the break (see :func:`wsss_ray.data.webdataset.read_shards`)."""
    from wsss_ray.data.webdataset import read_shards

    return read_shards(list(paths), shuffle_files=False).map_batches(
        _shard_rows, batch_format="numpy", batch_size=16
    )


def _shard_key(record_id: str, index: int) -> str:
    """The tar key of a sample: the id itself when WebDataset can group it (no dots, slashes or
    odd characters), else the record's index (the id is always in the json)."""
    return record_id if _SAFE_KEY.fullmatch(record_id) else f"{index:09d}"


_SAFE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def write_segmentation_shards(
    source: SegSource,
    out_dir: str | Path,
    samples_per_shard: int = 1000,
    prefix: str = "seg",
    progress: bool = True,
) -> list[str]:
    """The shard paths :func:`shard_segmentation` writes (its summary is dropped)."""
    return shard_segmentation(source, out_dir, samples_per_shard, prefix, progress).shards


def shard_segmentation(
    source: SegSource,
    out_dir: str | Path,
    samples_per_shard: int = 1000,
    prefix: str = "seg",
    progress: bool = True,
) -> ShardSummary:
    """Shard a source into ``{prefix}-{i:06d}.tar``: ``{key}.jpg`` (the original JPEG bytes),
    ``{key}.png`` (the mask as a grey class-index PNG, palette masks converted), ``{key}.json``
    (``id``, ``labels``, ``dataset``, ``split``). The class names go to ``class_names.txt``
    beside the tars. Each tar is written under a ``.tmp`` name and renamed when complete; a crash
    deletes the half-written one (:class:`~wsss_ray.data.shards.ShardSink`).

    Every image is decoded in full and every mask read: an empty, truncated or corrupt image,
    one over ``PIL.Image.MAX_IMAGE_PIXELS``, an unreadable mask or one of another size than its
    image is skipped, counted and named; so are the images the source left out
    (``source.skipped``), and the annotations it left out are noted. Returns the
    :class:`~wsss_ray.data.shards.ShardSummary` (every skip also in ``{prefix}-skipped.txt``)."""
    from tqdm import tqdm

    from wsss_ray.data.shards import ShardSink, ShardSummary, decode_image, why_unusable

    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be >= 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "class_names.txt").write_text("\n".join(source.class_names) + "\n")
    summary = ShardSummary()
    records = source.records
    with (
        ShardSink(out_dir, prefix, samples_per_shard, mtime=0.0) as sink,
        summary.listing(out_dir / f"{prefix}-skipped.txt"),
    ):
        for named in source.skipped:  # left out when the source was opened
            summary.skip(named, "mask size differs" if " differs from " in named else "unreadable")
        for named in source.skipped_annotations:
            summary.note(named, "annotations left out")
        for i, r in enumerate(tqdm(records, disable=not progress, unit="img", desc="sharding")):
            try:
                jpeg = Path(r.image).read_bytes()
                with decode_image(jpeg) as im:
                    size = im.size
            except Exception as err:  # noqa: BLE001 - any unusable image: skipped, named
                why, kind = why_unusable(err)
                summary.skip(f"{r.id} ({r.image}): {why}", kind)
                continue
            try:
                mask = read_mask(r.mask)
            except Exception as err:  # noqa: BLE001
                why, _ = why_unusable(err)
                summary.skip(f"{r.id} ({r.mask}): unreadable mask ({why})", "unreadable mask")
                continue
            if mask.shape != (size[1], size[0]):
                summary.skip(
                    f"{r.id} ({r.mask}): mask {mask.shape[1]} x {mask.shape[0]} differs from "
                    f"image {size[0]} x {size[1]}",
                    "mask size differs",
                )
                continue
            meta = {
                "id": r.id,
                "labels": image_labels(mask),
                "dataset": source.name,
                "split": source.split,
            }
            sink.write_sample(
                {
                    "__key__": _shard_key(r.id, i),
                    "jpg": jpeg,
                    "png": encode_mask(mask),
                    "json": json.dumps(meta).encode(),
                }
            )
            summary.written += 1
    summary.shards = sink.paths
    return summary
