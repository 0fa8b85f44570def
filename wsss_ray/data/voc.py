"""PASCAL VOC 2012 segmentation (and SBD's train_aug) as a :class:`SegSource`.

Layout (the ``VOC2012`` folder): ``JPEGImages/*.jpg``; ``SegmentationClass/*.png`` (palette,
255 on object boundaries); ``SegmentationClassAug/*.png`` (SBD's 10,582-image train_aug, grey);
``ImageSets/Segmentation/{train,val,train_aug}.txt``. ``train_aug`` reads the grey Aug masks;
other splits the palette masks (``aug`` forces either).
"""

from __future__ import annotations

from pathlib import Path

from wsss_ray.data.segmentation import SegSource, voc_style_source

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
    aug = split == "train_aug" if aug is None else aug
    mask_folder = "SegmentationClassAug" if aug else "SegmentationClass"
    return voc_style_source(
        "voc", Path(root), split, mask_folder, "Segmentation", VOC_CLASSES, 0.95, "VOC"
    )
