"""Training data for VPL phase 2: images of a segmentation split paired with phase-1 pseudo-labels.

Rows are paths only until a CPU decode actor reads them, so the driver never holds images. Each
epoch the row order is reshuffled, then every image gets the WeCLIP augmentation: random rescale
(0.5-2.0 by default; bilinear for the image, nearest for the labels), padding to the crop size
(image with the mean colour, labels with 255 = ignore), a random crop and a random horizontal flip.
The image-level labels (``present``) come from the ground-truth masks, as every reader here derives
them: that is the weak supervision VPL is allowed; the pixel targets are the pseudo-labels.

Columns handed to the train workers: ``image`` (B x S x S x 3 uint8), ``label`` (B x S x S int64,
255 = ignore) and ``present`` (B x K uint8, background always 1).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from wsss_ray.data.segmentation import SegSource, image_labels, read_mask

if TYPE_CHECKING:
    import ray.data

IGNORE = 255


def augment(
    image: np.ndarray,
    label: np.ndarray,
    crop: int,
    scale_range: tuple[float, float],
    hflip: bool,
    rng: np.random.Generator,
    pad_colour: tuple[int, int, int] = (0, 0, 0),
) -> tuple[np.ndarray, np.ndarray]:
    """(crop x crop x 3 uint8, crop x crop uint8): rescale by a random factor in ``scale_range``,
    pad up to ``crop`` (image with ``pad_colour``, labels with 255), random crop, random flip."""
    if image.shape[:2] != label.shape:
        raise ValueError(f"image {image.shape[:2]} and label {label.shape} sizes differ")
    h, w = label.shape
    s = float(rng.uniform(*scale_range))
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    if (nh, nw) != (h, w):
        image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
        label = np.asarray(Image.fromarray(label).resize((nw, nh), Image.NEAREST))
    ph, pw = max(crop - nh, 0), max(crop - nw, 0)
    if ph or pw:
        padded = np.empty((nh + ph, nw + pw, 3), np.uint8)
        padded[:] = np.asarray(pad_colour, np.uint8)
        padded[:nh, :nw] = image
        lab = np.full((nh + ph, nw + pw), IGNORE, np.uint8)
        lab[:nh, :nw] = label
        image, label = padded, lab
    y = int(rng.integers(0, image.shape[0] - crop + 1))
    x = int(rng.integers(0, image.shape[1] - crop + 1))
    image, label = image[y : y + crop, x : x + crop], label[y : y + crop, x : x + crop]
    if hflip and rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


class PseudoLabelDecoder:
    """The Ray Data decode actor: reads JPEG, pseudo-label PNG and ground-truth mask (for the
    image-level labels only), augments, and skips (and counts) rows it cannot read."""

    def __init__(
        self,
        num_classes: int,
        crop: int,
        scale_range: tuple[float, float],
        hflip: bool,
        mean: list[float],
        skip_counter: str | None = None,
    ):
        from wsss_ray.data.skips import SkipReporter

        self.skips = SkipReporter(skip_counter)
        self.num_classes = num_classes
        self.crop = crop
        self.scale_range = tuple(scale_range)
        self.hflip = hflip
        self.pad = tuple(int(round(255 * m)) for m in mean)
        self.rng = np.random.default_rng(int.from_bytes(os.urandom(8), "little"))

    def __call__(self, batch: dict) -> dict:
        images, labels, present, skipped = [], [], [], 0
        for img_path, lab_path, mask_path in zip(
            batch["image_path"], batch["label_path"], batch["mask_path"]
        ):
            try:
                image = np.asarray(Image.open(str(img_path)).convert("RGB"))
                # no label file (online labels): zeros, so only the crop padding reads 255
                label = (
                    read_mask(str(lab_path)) if lab_path else np.zeros(image.shape[:2], np.uint8)
                )
                classes = image_labels(read_mask(str(mask_path)))
            except Exception as err:  # a bad file: skip it, count it, keep training
                print(f"[wsss_ray] skipping {img_path}: {err}", flush=True)
                skipped += 1
                continue
            if label.shape != image.shape[:2]:
                label = np.asarray(Image.fromarray(label).resize(image.shape[1::-1], Image.NEAREST))
            img, lab = augment(image, label, self.crop, self.scale_range, self.hflip, self.rng)
            vec = np.zeros(self.num_classes, np.uint8)
            vec[0] = 1
            vec[[c for c in classes if c < self.num_classes]] = 1
            images.append(img)
            labels.append(lab.astype(np.int64))
            present.append(vec)
        self.skips.add(skipped)
        n, s, k = len(images), self.crop, self.num_classes
        out = {
            "image": np.stack(images) if n else np.zeros((0, s, s, 3), np.uint8),
            "label": np.stack(labels) if n else np.zeros((0, s, s), np.int64),
            "present": np.stack(present) if n else np.zeros((0, k), np.uint8),
            "skipped": np.zeros(n, np.int64),
        }
        if n:
            out["skipped"][0] = skipped
        return out


def missing_pseudo_labels(source: SegSource, label_dir: str | Path) -> list[str]:
    """Ids of the split with no ``<label_dir>/<id>.png``."""
    label_dir = Path(label_dir)
    return [r.id for r in source.records if not (label_dir / f"{r.id}.png").is_file()]


def pseudo_label_dataset(
    source: SegSource,
    label_dir: str | Path | None,
    crop: int,
    scale_range: tuple[float, float] = (0.5, 2.0),
    hflip: bool = True,
    mean: list[float] | None = None,
    batch_size: int = 16,
    actors: tuple[int, int] = (1, 2),
    cpus_per_actor: float = 1.0,
    skip_counter: str | None = None,
) -> ray.data.Dataset:
    """The phase-2 training dataset (see the module docstring). Every record must have a
    pseudo-label PNG; a clear error names how many are missing and which job writes them.
    ``label_dir=None`` (online labels): the "label" column is 0 on the image and 255 on the
    crop padding, nothing more."""
    import ray.data

    missing = missing_pseudo_labels(source, label_dir) if label_dir is not None else []
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(source.records)} images have no pseudo-label in {label_dir} "
            f"(e.g. {missing[0]}.png); run jobs/vpl_pseudo_labels.py on this split first"
        )
    items = [
        {
            "image_path": r.image,
            "label_path": str(Path(label_dir) / f"{r.id}.png") if label_dir is not None else "",
            "mask_path": r.mask,
        }
        for r in source.records
    ]
    ds = ray.data.from_items(items).random_shuffle()
    return ds.map_batches(
        PseudoLabelDecoder,
        fn_constructor_kwargs={
            "num_classes": len(source.class_names),
            "crop": crop,
            "scale_range": tuple(scale_range),
            "hflip": hflip,
            "mean": list(mean) if mean is not None else [0.0, 0.0, 0.0],
            "skip_counter": skip_counter,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=actors[0], max_size=actors[1]),
        num_cpus=cpus_per_actor,
    )
