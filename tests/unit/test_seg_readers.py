"""The segmentation readers return exactly the masks and labels the synthetic generator wrote:
VOC palette (255 boundaries) and SBD grey layouts, COCO polygons / compressed RLE / crowd
(uncompressed RLE) with remapped category ids and a semantic-PNG cache built once, and the Pascal
Context layout; bad roots, splits and kinds fail with errors that name the problem."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from wsss_ray.data import synthetic as syn
from wsss_ray.data.coco import COCO_CLASSES, coco_source
from wsss_ray.data.context import CONTEXT_CLASSES, context_source
from wsss_ray.data.segmentation import (
    decode_mask_bytes,
    encode_mask,
    image_labels,
    open_source,
    read_mask,
)
from wsss_ray.data.voc import VOC_CLASSES, voc_source


def test_class_lists():
    assert len(VOC_CLASSES) == 21 and VOC_CLASSES[0] == "background"
    assert VOC_CLASSES[15] == "person" and VOC_CLASSES[20] == "tvmonitor"
    assert len(COCO_CLASSES) == 81 and COCO_CLASSES[:2] == ["background", "person"]
    assert COCO_CLASSES[-1] == "toothbrush"
    assert len(CONTEXT_CLASSES) == 60 and CONTEXT_CLASSES[0] == "background"
    assert CONTEXT_CLASSES[-1] == "wood" and len(set(CONTEXT_CLASSES)) == 60


def test_voc_palette_and_aug_masks(tmp_path):
    root = syn.write_voc(tmp_path / "VOC2012", 6, 4)
    val = voc_source(root, "val")
    assert val.name == "voc" and val.split == "val"
    assert val.class_names == syn.CLASS_NAMES and val.bg_thresh == 0.95
    assert [r.id for r in val.records] == [f"2007_{syn.make_scene(i).key}" for i in range(6, 10)]
    for i, rec in zip(range(6, 10), val.records):
        scene = syn.make_scene(i)
        assert Image.open(rec.mask).mode == "P"
        mask = read_mask(rec.mask)  # palette indices, not colours
        assert mask.dtype == np.uint8
        np.testing.assert_array_equal(mask, syn.with_boundaries(scene.mask))
        assert (mask == 255).any() and image_labels(mask) == scene.labels
    aug = voc_source(root, "train_aug")
    assert len(aug.records) == 6 and all("SegmentationClassAug" in r.mask for r in aug.records)
    for i, rec in enumerate(aug.records):
        scene = syn.make_scene(i)
        np.testing.assert_array_equal(read_mask(rec.mask), scene.mask)
        assert image_labels(read_mask(rec.mask)) == scene.labels
    # aug forces either mask folder; without class_names.txt the VOC names apply
    assert "SegmentationClassAug" in voc_source(root, "val", aug=True).records[0].mask
    (root / "class_names.txt").unlink()
    assert voc_source(root, "train").class_names == VOC_CLASSES


def test_read_mask_modes(tmp_path):
    idx = np.array([[0, 1, 2], [255, 20, 0]], np.uint8)
    pal = Image.fromarray(idx, mode="P")
    pal.putpalette(syn.voc_palette())
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "p.png"), idx)
    np.testing.assert_array_equal(decode_mask_bytes(encode_mask(idx)), idx)
    Image.fromarray(idx.astype(np.uint16)).save(tmp_path / "i.png")  # 16-bit grey
    np.testing.assert_array_equal(read_mask(tmp_path / "i.png"), idx)
    Image.fromarray(np.full((2, 2), 300, np.uint16)).save(tmp_path / "big.png")
    with pytest.raises(ValueError, match="outside 0..255"):
        read_mask(tmp_path / "big.png")
    Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="palette or grey, not RGB"):
        read_mask(tmp_path / "rgb.png")
    assert image_labels(idx) == [1, 2, 20]
    assert image_labels(np.zeros((4, 4), np.uint8)) == []


def _coco_kinds(root):
    doc = json.loads((root / "annotations" / "instances_val2014.json").read_text())
    kinds = set()
    for a in doc["annotations"]:
        seg = a["segmentation"]
        if a["iscrowd"]:
            assert isinstance(seg["counts"], list)  # uncompressed RLE
            kinds.add("crowd")
        else:
            kinds.add("polygon" if isinstance(seg, list) else "rle")
            assert isinstance(seg, list) or isinstance(seg["counts"], str)  # compressed RLE
    return kinds


def test_coco_masks_with_polygons_rle_and_crowd(tmp_path):
    root = syn.write_coco(tmp_path / "coco", 6, 6, crowd_prob=0.3, rle_prob=0.4)
    assert _coco_kinds(root) == {"polygon", "rle", "crowd"}  # the fixture really has all three
    src = open_source("coco", root, "val")
    assert src.name == "coco" and src.class_names == syn.CLASS_NAMES and src.bg_thresh == 0.85
    assert len(src.records) == 6
    assert [r.id for r in src.records] == [f"COCO_val2014_{i:012d}" for i in range(7, 13)]
    scenes = list(syn.scenes(6, start=6, crowd_prob=0.3))
    crowd_pixels = 0
    for scene, rec in zip(scenes, src.records):
        assert os.path.isfile(rec.image)
        mask = read_mask(rec.mask)
        np.testing.assert_array_equal(mask, syn.coco_semantic_mask(scene))
        assert set(np.unique(mask)) <= {0, 1, 2, 3, 4, 5, 255}  # ids 1,3,7,12,20 -> 1..5
        crowd_pixels += int((mask == 255).sum())
    assert crowd_pixels > 0
    # the semantic PNGs are written once: a second call reuses them untouched, without even
    # reading the annotation file
    before = {r.mask: os.stat(r.mask).st_mtime_ns for r in src.records}
    (root / "annotations" / "instances_val2014.json").rename(tmp_path / "ann.json")
    again = coco_source(root, "val")
    assert again.records == src.records and again.class_names == src.class_names
    assert {r.mask: os.stat(r.mask).st_mtime_ns for r in again.records} == before


def test_coco_cache_resumes_and_notices_changed_annotations(tmp_path):
    root = syn.write_coco(tmp_path / "coco", 2, 4, seed=1, size=48, crowd_prob=0.3)
    cache = tmp_path / "cache"
    src = coco_source(root, "val", cache_dir=cache)
    assert all(r.mask.startswith(str(cache)) for r in src.records)
    assert not (root / "wsss_semantic").exists()
    # a conversion interrupted after some PNGs: it resumes, skipping the finished ones
    stamp = json.loads((cache / "DONE.json").read_text())
    (cache / "CONVERTING.json").write_text(
        json.dumps({"version": stamp["version"], "fingerprint": stamp["fingerprint"]})
    )
    (cache / "DONE.json").unlink()
    kept, lost = src.records[0].mask, src.records[1].mask
    os.remove(lost)
    t_kept = os.stat(kept).st_mtime_ns
    resumed = coco_source(root, "val", cache_dir=cache)
    assert os.stat(kept).st_mtime_ns == t_kept and os.path.isfile(lost)
    assert (cache / "DONE.json").is_file() and not (cache / "CONVERTING.json").exists()
    scenes = list(syn.scenes(4, seed=1, size=48, start=2, crowd_prob=0.3))
    for scene, rec in zip(scenes, resumed.records):
        np.testing.assert_array_equal(read_mask(rec.mask), syn.coco_semantic_mask(scene))
    # annotations regenerated with different content: every mask is rebuilt
    syn.write_coco(root, 2, 4, seed=2, size=48, crowd_prob=0.3)
    rebuilt = coco_source(root, "val", cache_dir=cache)
    scenes = list(syn.scenes(4, seed=2, size=48, start=2, crowd_prob=0.3))
    for scene, rec in zip(scenes, rebuilt.records):
        np.testing.assert_array_equal(read_mask(rec.mask), syn.coco_semantic_mask(scene))


def test_context_layout(tmp_path):
    root = syn.write_context(tmp_path / "VOC2010", 3, 4, seed=2, size=64)
    src = context_source(root, "val")
    assert src.name == "context" and src.bg_thresh == 0.36 and len(src.records) == 4
    assert src.class_names == syn.CLASS_NAMES
    assert [r.id for r in src.records] == [f"2008_{syn.make_scene(i, 2).key}" for i in range(3, 7)]
    for i, rec in zip(range(3, 7), src.records):
        scene = syn.make_scene(i, 2, 64)
        mask = read_mask(rec.mask)
        np.testing.assert_array_equal(mask, scene.mask)
        assert image_labels(mask) == scene.labels
    assert len(open_source("context", root, "train").records) == 3
    (root / "class_names.txt").unlink()
    assert context_source(root, "val").class_names == CONTEXT_CLASSES


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset root not found.*nope"):
        open_source("voc", tmp_path / "nope", "val")
    root = syn.write_voc(tmp_path / "VOC2012", 1, 1, size=32)
    with pytest.raises(FileNotFoundError, match="split file not found.*test.txt"):
        open_source("voc", root, "test")
    with pytest.raises(ValueError, match="unknown dataset kind 'ade'"):
        open_source("ade", root, "val")
    with pytest.raises(FileNotFoundError, match="annotation file not found.*instances_val2014"):
        open_source("coco", tmp_path, "val")
    with pytest.raises(
        FileNotFoundError, match="Context folder not found.*SegmentationClassContext"
    ):
        open_source("context", root, "val")  # a VOC2012 folder is not the Context layout
    name = (root / "ImageSets/Segmentation/val.txt").read_text().split()[0]
    os.remove(root / "JPEGImages" / f"{name}.jpg")
    with pytest.raises(FileNotFoundError, match=f"{name} is listed but .*{name}.jpg is missing"):
        open_source("voc", root, "val")
