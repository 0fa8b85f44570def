"""COCO-Object as GroupViT / PGSeg define it, on hand-made files in the official layouts:
COCO-Stuff stuffthingmaps (pixel = category id - 1, 255 unlabeled) and instances_val2017.json."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from wsss_ray.data.coco import COCO_CLASSES
from wsss_ray.data.coco_object import THING_IDS, coco_object_source, from_stuffthingmap
from wsss_ray.data.segmentation import open_source, read_mask
from wsss_ray.eval.zero_shot import prompt_class_names


def test_the_80_thing_ids():
    assert len(THING_IDS) == 80 and THING_IDS == sorted(THING_IDS) and THING_IDS[-1] == 90
    assert not {12, 26, 29, 30, 45, 66, 68, 69, 71, 83} & set(THING_IDS)


def test_stuffthingmap_values_hand_computed():
    # person (id 1 -> 0), car (3 -> 2), stop sign (13 -> 12: the 12th thing, after the unused
    # id 12), toothbrush (90 -> 89: the 80th), a stuff class (value 91..181), unlabeled 255
    raw = np.array([[0, 2, 12], [89, 95, 255]], np.uint8)
    assert from_stuffthingmap(raw).tolist() == [[1, 3, 12], [80, 0, 0]]
    assert COCO_CLASSES[12] == "stop sign" and COCO_CLASSES[80] == "toothbrush"


def _jpeg(path, h, w):
    Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(path)


def test_source_from_stuffthingmaps_as_the_archive_unpacks(tmp_path):
    (tmp_path / "val2017").mkdir()
    maps = tmp_path / "stuffthingmaps_trainval2017" / "val2017"
    maps.mkdir(parents=True)
    for i, value in enumerate([0, 2]):
        stem = f"{i:012d}"
        _jpeg(tmp_path / "val2017" / f"{stem}.jpg", 4, 6)
        raw = np.full((4, 6), 255, np.uint8)
        raw[1:3, 2:4] = value
        raw[0, 0] = 120  # a stuff class
        Image.fromarray(raw, mode="L").save(maps / f"{stem}.png")
    Image.fromarray(np.zeros((4, 6), np.uint8), mode="L").save(maps / "x_labelTrainIds.png")
    src = open_source("coco_object", tmp_path, "val")
    assert src.name == "coco_object" and len(src.class_names) == 81 and src.bg_thresh == 0.85
    assert [r.id for r in src.records] == ["000000000000", "000000000001"]  # TrainIds skipped
    mask = read_mask(src.records[1].mask)
    assert mask[1:3, 2:4].tolist() == [[3, 3], [3, 3]] and mask.sum() == 4 * 3
    assert 255 not in np.unique(mask)  # no ignore label: unlabeled is background
    # cached: a second open reads DONE.json (the maps may even be gone)
    import shutil

    shutil.rmtree(tmp_path / "stuffthingmaps_trainval2017")
    assert len(open_source("coco_object", tmp_path, "val").records) == 2


def test_source_from_instances_json_crowd_keeps_its_class(tmp_path):
    (tmp_path / "val2017").mkdir()
    (tmp_path / "annotations").mkdir()
    _jpeg(tmp_path / "val2017" / "000000000007.jpg", 10, 10)
    square = [[1.0, 1.0, 5.0, 1.0, 5.0, 5.0, 1.0, 5.0]]
    rle = {"counts": [66, 3, 7, 3, 21], "size": [10, 10]}  # uncompressed RLE, column-major
    doc = {
        "images": [{"id": 7, "file_name": "000000000007.jpg", "height": 10, "width": 10}],
        "categories": [{"id": c, "name": COCO_CLASSES[i + 1]} for i, c in enumerate(THING_IDS)],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 13, "segmentation": square, "iscrowd": 0,
             "area": 16.0, "bbox": [1, 1, 4, 4]},
            {"id": 2, "image_id": 7, "category_id": 1, "segmentation": rle, "iscrowd": 1,
             "area": 6.0, "bbox": [6, 6, 2, 3]},
        ],
    }  # fmt: skip
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(doc))
    src = coco_object_source(tmp_path, "val", source="instances")
    mask = read_mask(src.records[0].mask)
    assert set(np.unique(mask)) == {0, 1, 12}  # crowd person stays person (1), not ignore
    assert (mask == 1).sum() == 6 and (mask == 12).sum() > 0


def test_missing_ground_truth_is_a_clear_error(tmp_path):
    (tmp_path / "val2017").mkdir()
    with pytest.raises(FileNotFoundError, match="instances_val2017.json"):
        open_source("coco_object", tmp_path, "val")
    with pytest.raises(FileNotFoundError, match="stuffthingmaps"):
        coco_object_source(tmp_path, "val", source="stuffthingmaps")


def test_prompt_names_reference_and_readable():
    from wsss_ray.data.context import CONTEXT_CLASSES
    from wsss_ray.data.voc import VOC_CLASSES

    voc = prompt_class_names("voc", VOC_CLASSES, "reference")
    assert [voc[11], voc[16], voc[20]] == ["table", "plant", "monitor"]
    readable = prompt_class_names("voc", VOC_CLASSES, "readable")
    assert [readable[11], readable[16], readable[20]] == [
        "dining table",
        "potted plant",
        "tv monitor",
    ]
    ctx = prompt_class_names("context", CONTEXT_CLASSES, "reference")
    assert ctx[1] == "airplane" and "plant" in ctx and "monitor" in ctx and len(ctx) == 60
    assert prompt_class_names("coco_object", COCO_CLASSES, "reference") == COCO_CLASSES
    shapes = ["background", "circle", "pointy_star"]
    assert prompt_class_names("voc", shapes, "reference")[1] == "circle"
    assert prompt_class_names("voc", shapes, "reference")[2] == "pointy star"
    assert prompt_class_names("", shapes, "readable")[2] == "pointy star"
