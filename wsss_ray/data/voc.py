"""PASCAL VOC 2012 segmentation (and SBD's train_aug) as a :class:`SegSource`.

Layout (the ``VOC2012`` folder): ``JPEGImages/*.jpg``; ``SegmentationClass/*.png`` (palette,
255 on object boundaries); ``SegmentationClassAug/*.png`` (SBD's 10,582-image train_aug, grey);
``ImageSets/Segmentation/{train,val,train_aug}.txt``. ``train_aug`` reads the grey Aug masks;
other splits the palette masks (``aug`` forces either).
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

VOC_CLASSES = [
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]


def voc_source(root: str | Path, split: str = "val", aug: bool | None = None) -> SegSource:
    """VOC 2012 ``split`` (``train`` | ``val`` | ``train_aug`` | any ``ImageSets`` list) under
    the ``VOC2012`` folder ``root``. ``aug=None`` reads the grey SBD ``SegmentationClassAug`` for
    ``train_aug`` and the palette ``SegmentationClass`` otherwise; True/False force either."""
    root = Path(root)
    aug = split == "train_aug" if aug is None else aug
    mask_dir = root / ("SegmentationClassAug" if aug else "SegmentationClass")
    for folder in (root / "JPEGImages", mask_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"VOC folder not found: {folder}")
    names = read_split(root / "ImageSets" / "Segmentation" / f"{split}.txt")
    records = [
        SegRecord(n, str(root / "JPEGImages" / f"{n}.jpg"), str(mask_dir / f"{n}.png"))
        for n in names
    ]
    require_files(records, f"VOC {split}")
    return SegSource("voc", split, class_names_override(root, VOC_CLASSES), records, bg_thresh=0.95)
