"""A deterministic synthetic "shapes" world in the real on-disk formats.

Tests and the default demo need data without downloads. Each image holds 1-3 coloured shapes on a
background with a tone (dark, light) and a pattern (striped, checkered, plain); each shape class
has a typical colour. Its caption names the shapes in varied sentences and usually the
background too ("... on a dark striped background"), as real captions name the scene around
their objects, and its per-pixel mask says which shape class owns each pixel. The same scene can be
written as WebDataset image-text shards, as a PASCAL VOC 2012 layout (palette masks with 255
boundaries, SBD-style grey ``SegmentationClassAug``) and as a COCO 2014 layout
(``instances_*.json`` with polygons, RLE and ``iscrowd``), so every reader in the project is
exercised on real formats with a known ground truth.

Shapes are polygons rasterised by pycocotools, so a COCO reader reproduces the masks bit-exactly.
Everything is a pure function of (seed, index): the same call writes the same bytes.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

SHAPES = ["circle", "square", "triangle", "star", "cross"]
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 215),
    "yellow": (230, 205, 40),
    "purple": (145, 55, 185),
    "orange": (240, 135, 25),
}
COLOUR_NAMES = list(COLOURS)
#: Each shape class has a typical colour, as real object classes have a typical look (bananas are
#: yellow). With probability ``TYPICAL_COLOUR_PROB`` a shape is painted in it, otherwise in any
#: colour. This is what makes the world learnable by the tiny CPU models: at 96 px with 16 px
#: patches colour is far easier to see than outline, and a text tower only learns shape words if
#: the caption needs them, so captions name colours only with probability ``CAPTION_COLOUR_PROB``.
TYPICAL_COLOUR = {
    "circle": "red",
    "square": "blue",
    "triangle": "green",
    "star": "yellow",
    "cross": "purple",
}
TYPICAL_COLOUR_PROB = 0.8
CAPTION_COLOUR_PROB = 0.3
#: Backgrounds have a tone and a pattern that captions name with probability
#: ``CAPTION_BACKGROUND_PROB``. Without them the background is never described, so nothing in
#: the text gives a background segment content of its own, and a grouping model's background
#: tokens end up naming the shapes: zero-shot segmentation labels the background as a shape
#: (docs/EVALUATION.md).
BACKGROUND_TONES = {"dark": (55.0, 95.0), "light": (150.0, 195.0)}
BACKGROUND_PATTERNS = ["striped", "checkered", "plain"]
CAPTION_BACKGROUND_PROB = 0.8
#: bumped whenever the generated content changes, so cached synthetic data is rewritten
GENERATOR_VERSION = 4
#: VOC-layout class names: index 0 is background, then the shapes.
CLASS_NAMES = ["background", *SHAPES]
#: Non-contiguous COCO category ids (as in real COCO) so readers must remap them to 1..K.
COCO_CATEGORY_IDS = [1, 3, 7, 12, 20]

_TEMPLATES = {
    1: [
        "a photo of {a}.",
        "{a} on a textured background.",
        "there is {a} in the picture.",
        "an image showing {a}.",
        "a close-up of {a}.",
        "just {a}, nothing else.",
    ],
    2: [
        "{a} and {b}.",
        "{a} next to {b}.",
        "a photo with {a} and {b}.",
        "two shapes: {a} and {b}.",
        "{b} beside {a} on a patterned background.",
    ],
    3: [
        "{a}, {b} and {c}.",
        "three shapes: {a}, {b} and {c}.",
        "a picture of {a}, {b} and {c}.",
        "{c} near {a} and {b}.",
    ],
}


@dataclass
class ShapeObject:
    shape: str
    colour: str
    polygon: list[float]  # x0, y0, x1, y1, ... in pixel coordinates
    crowd: bool = False

    @property
    def label(self) -> int:
        return SHAPES.index(self.shape) + 1

    def phrase(self, with_colour: bool = True) -> str:
        words = f"{self.colour} {self.shape}" if with_colour else self.shape
        article = "an" if words[0] in "aeiou" else "a"
        return f"{article} {words}"


@dataclass
class Scene:
    key: str
    image: np.ndarray  # H x W x 3 uint8
    mask: np.ndarray  # H x W uint8, 0 = background, k = SHAPES[k-1]; no ignore pixels
    objects: list[ShapeObject]
    caption: str
    labels: list[int] = field(default_factory=list)  # sorted present class ids (1..K)

    def jpeg(self, quality: int = 95) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(self.image).save(buf, format="JPEG", quality=quality)
        return buf.getvalue()

    def meta(self) -> dict:
        return {
            "key": self.key,
            "labels": self.labels,
            "objects": [{"shape": o.shape, "colour": o.colour} for o in self.objects],
        }


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[float]:
    if shape == "circle":
        pts = [(r, 2 * math.pi * i / 28) for i in range(28)]
    elif shape == "square":
        pts = [(r, angle + math.pi / 4 + i * math.pi / 2) for i in range(4)]
    elif shape == "triangle":
        pts = [(r, angle + i * 2 * math.pi / 3) for i in range(3)]
    elif shape == "star":
        pts = [(r if i % 2 == 0 else 0.45 * r, angle + i * math.pi / 5) for i in range(10)]
    elif shape == "cross":
        a, b = r, r * 0.35
        xy = [
            (b, a),
            (b, b),
            (a, b),
            (a, -b),
            (b, -b),
            (b, -a),
            (-b, -a),
            (-b, -b),
            (-a, -b),
            (-a, b),
            (-b, b),
            (-b, a),
        ]
        c, s = math.cos(angle), math.sin(angle)
        return [v for x, y in xy for v in (cx + c * x - s * y, cy + s * x + c * y)]
    else:
        raise ValueError(f"unknown shape {shape}")
    return [v for rad, t in pts for v in (cx + rad * math.cos(t), cy + rad * math.sin(t))]


def polygon_mask(polygon: list[float], h: int, w: int) -> np.ndarray:
    """Rasterise one polygon exactly as pycocotools does for COCO annotations."""
    rle = mask_utils.frPyObjects([polygon], h, w)
    return mask_utils.decode(mask_utils.merge(rle)).astype(bool)


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """A greyish background of a random tone and pattern, and its description ("dark striped")."""
    tone = list(BACKGROUND_TONES)[int(rng.integers(len(BACKGROUND_TONES)))]
    pattern = BACKGROUND_PATTERNS[int(rng.integers(len(BACKGROUND_PATTERNS)))]
    base = rng.uniform(*BACKGROUND_TONES[tone])
    tint = rng.uniform(-10, 10, size=3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # patterns scale with the image, so they look the same at every generated size
    if pattern == "striped":
        freq = rng.uniform(0.15, 0.35) * 96 / size
        theta = rng.uniform(0, math.pi)
        texture = 28 * np.sign(np.sin(freq * (xx * math.cos(theta) + yy * math.sin(theta))))
    elif pattern == "checkered":
        period = rng.uniform(6, 12) * size / 96
        texture = 28 * ((((xx // period) + (yy // period)) % 2) * 2 - 1)
    else:
        texture = np.zeros_like(xx)
    noise = rng.normal(0, 8, size=(size, size, 1))
    img = base + tint[None, None, :] + texture[..., None] + noise
    return np.clip(img, 0, 255), f"{tone} {pattern}"


def make_scene(index: int, seed: int = 0, size: int = 128, crowd_prob: float = 0.0) -> Scene:
    """Scene number ``index`` of the world with ``seed``: a pure function of its arguments."""
    rng = np.random.default_rng([seed, index])
    for _attempt in range(50):
        n = int(rng.integers(1, 4))
        img, background = _background(rng, size)
        mask = np.zeros((size, size), np.uint8)
        owner = np.full((size, size), -1, np.int16)
        objects: list[ShapeObject] = []
        areas = []
        for i in range(n):
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            if rng.random() < TYPICAL_COLOUR_PROB:
                colour = TYPICAL_COLOUR[shape]
            else:
                colour = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
            r = rng.uniform(0.14, 0.3) * size
            cx, cy = rng.uniform(r, size - r, size=2)
            poly = _polygon(shape, cx, cy, r, rng.uniform(0, 2 * math.pi))
            m = polygon_mask(poly, size, size)
            shade = np.array(COLOURS[colour], np.float32) + rng.normal(0, 6, size=(size, size, 3))
            img[m] = shade[m]
            mask[m] = SHAPES.index(shape) + 1
            owner[m] = i
            areas.append(m.sum())
            objects.append(
                ShapeObject(
                    shape,
                    colour,
                    [round(v, 2) for v in poly],
                    crowd=bool(rng.random() < crowd_prob),
                )
            )
        visible = [(owner == i).sum() / max(a, 1) for i, a in enumerate(areas)]
        if min(visible) >= 0.4:
            break
    with_colour = bool(rng.random() < CAPTION_COLOUR_PROB)
    phrases = [o.phrase(with_colour) for o in objects]
    template = _TEMPLATES[len(objects)][int(rng.integers(len(_TEMPLATES[len(objects)])))]
    caption = template.format(**dict(zip("abc", phrases)))
    if rng.random() < CAPTION_BACKGROUND_PROB:
        for generic in (" on a textured background", " on a patterned background"):
            caption = caption.replace(generic, "")
        caption = caption.rstrip(".") + f" on a {background} background."
    caption = caption[0].upper() + caption[1:] if rng.random() < 0.5 else caption
    image = np.clip(img, 0, 255).astype(np.uint8)
    labels = sorted({o.label for o in objects})
    return Scene(f"{seed:04d}_{index:07d}", image, mask, objects, caption, labels)


def scenes(
    num: int, seed: int = 0, size: int = 128, start: int = 0, crowd_prob: float = 0.0
) -> Iterator[Scene]:
    for i in range(start, start + num):
        yield make_scene(i, seed, size, crowd_prob)


# ----------------------------------------------------------------------------- WebDataset
def write_webdataset(
    out_dir: str | Path,
    num_images: int,
    seed: int = 0,
    size: int = 128,
    samples_per_shard: int = 128,
) -> list[str]:
    """Image-text shards (``{key}.jpg``, ``{key}.txt``, ``{key}.json``); returns the tar paths."""
    from wsss_ray.data.shards import ShardSink  # local import: shards imports this module's peers

    out_dir = Path(out_dir)
    with ShardSink(
        out_dir, prefix="shapes", samples_per_shard=samples_per_shard, mtime=0.0
    ) as sink:
        for scene in scenes(num_images, seed, size):
            sink.write(scene.key, scene.jpeg(), scene.caption, scene.meta())
    return sink.paths


def _write_once(folder: Path, write: Callable[[], object], **params: int) -> None:
    """Call ``write`` unless ``folder/SETTINGS.json`` records the same generator version and
    ``params``; record them after it succeeds (so an interrupted write is redone)."""
    settings = {"version": GENERATOR_VERSION, **params}
    stamp = folder / "SETTINGS.json"
    if stamp.exists() and json.loads(stamp.read_text()) == settings:
        return
    write()
    stamp.write_text(json.dumps(settings))


def ensure_synthetic_shards(
    out_dir: str | Path, num_images: int, seed: int, size: int, samples_per_shard: int
) -> list[str]:
    """Write the synthetic shards once; reuse them when the same settings exist already."""
    out_dir = Path(out_dir)

    def write() -> None:
        for old in out_dir.glob("*.tar"):
            old.unlink()
        write_webdataset(out_dir, num_images, seed, size, samples_per_shard)

    _write_once(
        out_dir,
        write,
        num_images=num_images,
        seed=seed,
        size=size,
        samples_per_shard=samples_per_shard,
    )
    return sorted(str(p) for p in out_dir.glob("*.tar"))


def ensure_synthetic_voc(
    root: str | Path, num_train: int, num_val: int, seed: int, size: int
) -> Path:
    """Write the synthetic VOC2012 layout once; reuse it when the same settings exist."""
    root = Path(root)
    _write_once(
        root,
        lambda: write_voc(root, num_train, num_val, seed, size),
        num_train=num_train,
        num_val=num_val,
        seed=seed,
        size=size,
    )
    return root


# ------------------------------------------------------------------------------------ VOC
def voc_palette() -> list[int]:
    """The standard PASCAL VOC colour map (256 x RGB, flattened)."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def with_boundaries(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """VOC-style masks: pixels within ``width`` of a label change become 255 (ignore)."""
    out = mask.copy()
    edge = np.zeros(mask.shape, bool)
    for dy in range(-width, width + 1):
        for dx in range(-width, width + 1):
            shifted = np.roll(np.roll(mask, dy, 0), dx, 1)
            edge |= shifted != mask
    # np.roll wraps around; the image border is not a label change
    edge[:width, :] = edge[-width:, :] = False
    edge[:, :width] = edge[:, -width:] = False
    out[edge] = 255
    return out


def write_voc(
    root: str | Path, num_train: int, num_val: int, seed: int = 0, size: int = 128
) -> Path:
    """A PASCAL VOC 2012 layout (the ``VOC2012`` folder itself) with SBD-style train_aug."""
    root = Path(root)
    for sub in (
        "JPEGImages",
        "SegmentationClass",
        "SegmentationClassAug",
        "ImageSets/Segmentation",
    ):
        (root / sub).mkdir(parents=True, exist_ok=True)
    palette = voc_palette()
    splits: dict[str, list[str]] = {"train": [], "val": []}
    for split, start, num in (("train", 0, num_train), ("val", num_train, num_val)):
        for scene in scenes(num, seed, size, start=start):
            name = f"2007_{scene.key}"
            splits[split].append(name)
            (root / "JPEGImages" / f"{name}.jpg").write_bytes(scene.jpeg())
            pal = Image.fromarray(with_boundaries(scene.mask), mode="P")
            pal.putpalette(palette)
            pal.save(root / "SegmentationClass" / f"{name}.png")
            Image.fromarray(scene.mask, mode="L").save(
                root / "SegmentationClassAug" / f"{name}.png"
            )
    sets = root / "ImageSets" / "Segmentation"
    for split, names in splits.items():
        (sets / f"{split}.txt").write_text("\n".join(names) + "\n")
    (sets / "train_aug.txt").write_text("\n".join(splits["train"]) + "\n")
    (root / "class_names.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    return root


def write_context(
    root: str | Path, num_train: int, num_val: int, seed: int = 0, size: int = 128
) -> Path:
    """The converted Pascal Context layout (the ``VOC2010`` folder): ``JPEGImages/``, grey
    ``SegmentationClassContext/`` (0 = background), ``ImageSets/SegmentationContext/``."""
    root = Path(root)
    for sub in ("JPEGImages", "SegmentationClassContext", "ImageSets/SegmentationContext"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for split, start, num in (("train", 0, num_train), ("val", num_train, num_val)):
        names = []
        for scene in scenes(num, seed, size, start=start):
            name = f"2008_{scene.key}"
            names.append(name)
            (root / "JPEGImages" / f"{name}.jpg").write_bytes(scene.jpeg())
            Image.fromarray(scene.mask, mode="L").save(
                root / "SegmentationClassContext" / f"{name}.png"
            )
        (root / "ImageSets" / "SegmentationContext" / f"{split}.txt").write_text(
            "\n".join(names) + "\n"
        )
    (root / "class_names.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    return root


# ----------------------------------------------------------------------------------- COCO
def coco_semantic_mask(scene: Scene) -> np.ndarray:
    """The 0..K semantic mask a COCO reader must produce: annotations painted in order with
    contiguous ids, crowd regions 255."""
    h, w = scene.mask.shape
    out = np.zeros((h, w), np.uint8)
    for obj in scene.objects:
        m = polygon_mask(obj.polygon, h, w)
        out[m] = 255 if obj.crowd else obj.label
    return out


def write_coco(
    root: str | Path,
    num_train: int,
    num_val: int,
    seed: int = 0,
    size: int = 128,
    crowd_prob: float = 0.15,
    rle_prob: float = 0.3,
) -> Path:
    """A COCO 2014 layout: ``train2014/``, ``val2014/``, ``annotations/instances_*2014.json``.
    Non-crowd objects are polygons or compressed RLE; crowd objects use uncompressed RLE."""
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [
        {"id": cid, "name": name, "supercategory": "shape"}
        for cid, name in zip(COCO_CATEGORY_IDS, SHAPES)
    ]
    ann_id = 1
    for split, start, num in (("train", 0, num_train), ("val", num_train, num_val)):
        folder = root / f"{split}2014"
        folder.mkdir(exist_ok=True)
        rng = np.random.default_rng([seed, 7919, start])
        images, annotations = [], []
        for scene in scenes(num, seed, size, start=start, crowd_prob=crowd_prob):
            image_id = start + len(images) + 1
            file_name = f"COCO_{split}2014_{image_id:012d}.jpg"
            (folder / file_name).write_bytes(scene.jpeg())
            images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
            for obj in scene.objects:
                m = polygon_mask(obj.polygon, size, size)
                ys, xs = np.nonzero(m)
                bbox = [
                    float(xs.min()),
                    float(ys.min()),
                    float(np.ptp(xs) + 1),
                    float(np.ptp(ys) + 1),
                ]
                if obj.crowd:
                    seg = _uncompressed_rle(m)
                elif rng.random() < rle_prob:
                    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                    seg = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
                else:
                    seg = [obj.polygon]
                annotations.append(
                    {
                        "id": ann_id,
                        "image_id": image_id,
                        "category_id": COCO_CATEGORY_IDS[obj.label - 1],
                        "segmentation": seg,
                        "area": float(m.sum()),
                        "bbox": bbox,
                        "iscrowd": int(obj.crowd),
                    }
                )
                ann_id += 1
        doc = {
            "info": {"description": "wsss_ray synthetic shapes"},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(doc))
    return root


def _uncompressed_rle(m: np.ndarray) -> dict:
    flat = m.flatten(order="F").astype(np.uint8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:  # RLE starts with a run of zeros
        counts = [0, *counts]
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": counts}
