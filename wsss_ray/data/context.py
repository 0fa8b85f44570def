"""Pascal Context (60 classes incl. background; evaluation only) as a :class:`SegSource`, in the
commonly used converted layout (mmsegmentation's): the ``VOC2010`` folder with ``JPEGImages/``,
``SegmentationClassContext/*.png`` (grey, 0..59, 0 = background, 255 = ignore) and
``ImageSets/SegmentationContext/{train,val}.txt``.
"""

from __future__ import annotations

from pathlib import Path

from wsss_ray.data.segmentation import (
    SegRecord,
    SegSource,
    class_names_override,
    read_split,
    require_files,
)

CONTEXT_CLASSES = [
    "background", "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat",
    "book", "bottle", "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth",
    "computer", "cow", "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food",
    "grass", "ground", "horse", "keyboard", "light", "motorbike", "mountain", "mouse", "person",
    "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves", "sidewalk", "sign",
    "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor", "wall",
    "water", "window", "wood",
]  # fmt: skip


def context_source(root: str | Path, split: str = "val") -> SegSource:
    """Pascal Context ``split`` (``train`` | ``val``) under the converted ``VOC2010`` folder."""
    root = Path(root)
    mask_dir = root / "SegmentationClassContext"
    for folder in (root / "JPEGImages", mask_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"Pascal Context folder not found: {folder}")
    names = read_split(root / "ImageSets" / "SegmentationContext" / f"{split}.txt")
    records = [
        SegRecord(n, str(root / "JPEGImages" / f"{n}.jpg"), str(mask_dir / f"{n}.png"))
        for n in names
    ]
    require_files(records, f"Pascal Context {split}")
    return SegSource(
        "context", split, class_names_override(root, CONTEXT_CLASSES), records, bg_thresh=0.36
    )
