"""The segmentation readers return exactly the masks and labels the synthetic generator wrote:
VOC palette (255 boundaries) and SBD grey layouts, COCO polygons / compressed RLE / crowd
(uncompressed RLE) with remapped category ids, and the Pascal Context layout."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from wsss_ray.data import synthetic as syn
from wsss_ray.data.segmentation import image_labels, open_source, read_mask


def test_voc_palette_and_aug_masks(tmp_path):
    root = syn.write_voc(tmp_path / "VOC2012", 4, 3, seed=5, size=64)
    val = open_source("voc", root, "val")
    assert val.class_names == syn.CLASS_NAMES and val.bg_thresh == 0.95
    assert [r.id for r in val.records] == [f"2007_{syn.make_scene(i, 5).key}" for i in (4, 5, 6)]
    for i, rec in zip((4, 5, 6), val.records):
        scene = syn.make_scene(i, 5, 64)
        assert Image.open(rec.mask).mode == "P"
        mask = read_mask(rec.mask)  # palette indices, not colours
        np.testing.assert_array_equal(mask, syn.with_boundaries(scene.mask))
        assert (mask == 255).any() and image_labels(mask) == scene.labels
    aug = open_source("voc", root, "train_aug")
    for i, rec in enumerate(aug.records):
        scene = syn.make_scene(i, 5, 64)
        np.testing.assert_array_equal(read_mask(rec.mask), scene.mask)
        assert image_labels(read_mask(rec.mask)) == scene.labels


def test_coco_masks_with_polygons_rle_and_crowd(tmp_path):
    root = syn.write_coco(tmp_path / "coco", 2, 8, seed=3, size=64, crowd_prob=0.3, rle_prob=0.4)
    doc = json.loads((root / "annotations" / "instances_val2014.json").read_text())
    kinds = {
        "polygon" if isinstance(a["segmentation"], list)
        else "crowd" if a["iscrowd"]
        else "rle"
        for a in doc["annotations"]
    }  # fmt: skip
    assert kinds == {"polygon", "rle", "crowd"}  # the fixture really has all three
    src = open_source("coco", root, "val")
    assert src.class_names == syn.CLASS_NAMES and src.bg_thresh == 0.85
    assert len(src.records) == 8
    scenes = list(syn.scenes(8, 3, 64, start=2, crowd_prob=0.3))
    for scene, rec in zip(scenes, src.records):
        mask = read_mask(rec.mask)
        np.testing.assert_array_equal(mask, syn.coco_semantic_mask(scene))
        assert mask.max() <= 5 or 255 in mask  # ids 1, 3, 7, 12, 20 remapped to 1..5
        assert set(np.unique(mask)) <= {0, 1, 2, 3, 4, 5, 255}
    # the semantic PNGs are written once: a second call reuses them untouched
    before = {r.mask: os.stat(r.mask).st_mtime_ns for r in src.records}
    (root / "annotations" / "instances_val2014.json").unlink()  # not even re-read
    again = open_source("coco", root, "val")
    assert {r.mask: os.stat(r.mask).st_mtime_ns for r in again.records} == before


def test_context_layout(tmp_path):
    root = syn.write_context(tmp_path / "VOC2010", 2, 3, seed=2, size=64)
    src = open_source("context", root, "val")
    assert src.bg_thresh == 0.36 and len(src.records) == 3
    for i, rec in zip((2, 3, 4), src.records):
        np.testing.assert_array_equal(read_mask(rec.mask), syn.make_scene(i, 2, 64).mask)


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset root not found"):
        open_source("voc", tmp_path / "nope", "val")
    root = syn.write_voc(tmp_path / "VOC2012", 1, 1, size=32)
    with pytest.raises(FileNotFoundError, match="split file not found.*test.txt"):
        open_source("voc", root, "test")
    with pytest.raises(ValueError, match="unknown dataset kind"):
        open_source("ade", root, "val")
    with pytest.raises(FileNotFoundError, match="annotation file"):
        open_source("coco", tmp_path, "val")
