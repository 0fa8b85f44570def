"""Pascal Context (60 classes incl. background; evaluation only) as a :class:`SegSource`, in the
commonly used converted layout (mmsegmentation's): the ``VOC2010`` folder with ``JPEGImages/``,
``SegmentationClassContext/*.png`` (grey, 0..59, 0 = background, 255 = ignore) and
``ImageSets/SegmentationContext/{train,val}.txt``.
"""

from __future__ import annotations

from pathlib import Path

from wsss_ray.data.segmentation import SegSource, voc_style_source

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
    return voc_style_source(
        "context",
        Path(root),
        split,
        "SegmentationClassContext",
        "SegmentationContext",
        CONTEXT_CLASSES,
        0.36,
        "Pascal Context",
    )
