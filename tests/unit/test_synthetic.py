"""The synthetic shapes world: deterministic, consistent, and in the real on-disk layouts."""

from __future__ import annotations

import hashlib
import json
import tarfile

import numpy as np
from PIL import Image
from pycocotools.coco import COCO

from wsss_ray.data import synthetic as syn


def _digest(paths):
    h = hashlib.sha256()
    for p in paths:
        h.update(open(p, "rb").read())
    return h.hexdigest()


def test_scene_is_a_pure_function_of_seed_and_index():
    a, b, c = syn.make_scene(5, seed=1), syn.make_scene(5, seed=1), syn.make_scene(5, seed=2)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    assert not np.array_equal(a.image, c.image)


def test_scene_mask_labels_and_caption_agree():
    colour_captions = 0
    for i in range(30):
        s = syn.make_scene(i, size=96)
        present = sorted(set(np.unique(s.mask).tolist()) - {0})
        assert present == s.labels  # every object stays visible
        assert 1 <= len(s.objects) <= 3
        words = set(s.caption.lower().replace(",", " ").replace(".", " ").split())
        coloured = any(c in words for c in syn.COLOURS)  # not "red" in "checkered"
        colour_captions += coloured
        for obj in s.objects:
            assert obj.shape in s.caption
            assert not coloured or obj.colour in words  # all colours or none
        # shapes are painted in their colour: mean pixel of a class region is near it
        for obj in s.objects:
            region = s.mask == obj.label
            if region.sum() > 50 and len({o.label for o in s.objects}) == len(s.objects):
                err = np.abs(s.image[region].mean(0) - syn.COLOURS[obj.colour]).max()
                assert err < 40
    assert 3 <= colour_captions <= 20  # about CAPTION_COLOUR_PROB of captions name colours


def test_shapes_mostly_wear_their_typical_colour():
    objs = [o for i in range(200) for o in syn.make_scene(i, size=64).objects]
    typical = np.mean([o.colour == syn.TYPICAL_COLOUR[o.shape] for o in objs])
    # 0.8 typical plus 0.2 * 1/6 drawn typical by chance
    assert 0.75 < typical < 0.92


def test_captions_name_the_background_they_show():
    named = 0
    for i in range(60):
        s = syn.make_scene(i, size=96)
        found = [
            (t, p)
            for t in syn.BACKGROUND_TONES
            for p in syn.BACKGROUND_PATTERNS
            if f"on a {t} {p} background." in s.caption
        ]
        assert len(found) <= 1
        if not found:
            continue
        named += 1
        tone, pattern = found[0]
        bg = s.image[s.mask == 0].astype(np.float32)
        lo, hi = syn.BACKGROUND_TONES[tone]
        assert lo - 20 < bg.mean() < hi + 20  # the tone the caption names
        grey = s.image.astype(np.float32).mean(-1)
        bg_mask = s.mask == 0
        # stripes and checks make steps of 56 grey levels between neighbours; plain only noise
        big_steps = max(
            np.mean(np.abs(np.diff(grey, axis=a))[np.logical_and(*pair)] > 40)
            for a, pair in (
                (0, (bg_mask[1:], bg_mask[:-1])),
                (1, (bg_mask[:, 1:], bg_mask[:, :-1])),
            )
        )
        assert (big_steps < 0.01) == (pattern == "plain"), (pattern, big_steps)
    assert 36 <= named <= 58  # about CAPTION_BACKGROUND_PROB of 60


def test_captions_vary():
    caps = {syn.make_scene(i).caption.split(" ")[0].lower() for i in range(40)}
    assert len(caps) >= 5


def test_webdataset_shards_deterministic_and_well_formed(tmp_path):
    p1 = syn.write_webdataset(tmp_path / "a", 10, seed=3, size=64, samples_per_shard=4)
    p2 = syn.write_webdataset(tmp_path / "b", 10, seed=3, size=64, samples_per_shard=4)
    assert len(p1) == 3 and _digest(p1) == _digest(p2)
    with tarfile.open(p1[0]) as tf:
        names = tf.getnames()
        assert names[:3] == [f"{syn.make_scene(0, 3).key}.{e}" for e in ("jpg", "json", "txt")]
        meta = json.loads(tf.extractfile(names[1]).read())
        assert meta["labels"] == syn.make_scene(0, 3, 64).labels


def test_voc_layout(tmp_path):
    root = syn.write_voc(tmp_path / "VOC2012", num_train=6, num_val=3, seed=0, size=64)
    train = (root / "ImageSets/Segmentation/train.txt").read_text().split()
    val = (root / "ImageSets/Segmentation/val.txt").read_text().split()
    assert len(train) == 6 and len(val) == 3 and not set(train) & set(val)
    for i, name in enumerate(train + val):
        scene = syn.make_scene(i, 0, 64)
        assert Image.open(root / "JPEGImages" / f"{name}.jpg").size == (64, 64)
        pal = Image.open(root / "SegmentationClass" / f"{name}.png")
        assert pal.mode == "P" and pal.getpalette()[3:6] == [128, 0, 0]  # VOC colour of class 1
        arr = np.array(pal)
        assert set(np.unique(arr)) <= set(range(len(syn.CLASS_NAMES))) | {255}
        assert (arr == 255).any()  # boundaries
        keep = arr != 255
        assert np.array_equal(arr[keep], scene.mask[keep])
        aug = Image.open(root / "SegmentationClassAug" / f"{name}.png")
        assert aug.mode == "L" and np.array_equal(np.array(aug), scene.mask)


def test_coco_layout_polygons_rle_crowd(tmp_path):
    root = syn.write_coco(
        tmp_path / "coco", num_train=12, num_val=4, seed=0, size=64, crowd_prob=0.3, rle_prob=0.4
    )
    coco = COCO(str(root / "annotations/instances_train2014.json"))
    assert sorted(coco.getCatIds()) == syn.COCO_CATEGORY_IDS
    anns = coco.loadAnns(coco.getAnnIds())
    kinds = {
        ("crowd" if a["iscrowd"] else "poly" if isinstance(a["segmentation"], list) else "rle")
        for a in anns
    }
    assert kinds == {"crowd", "poly", "rle"}
    cat_to_label = {c: i + 1 for i, c in enumerate(syn.COCO_CATEGORY_IDS)}
    scene_list = list(syn.scenes(12, 0, 64, crowd_prob=0.3))
    for img, scene in zip(coco.loadImgs(coco.getImgIds()), scene_list):
        assert (root / "train2014" / img["file_name"]).exists()
        sem = np.zeros((64, 64), np.uint8)
        for a in coco.loadAnns(coco.getAnnIds(imgIds=img["id"], iscrowd=None)):
            m = coco.annToMask(a).astype(bool)
            sem[m] = 255 if a["iscrowd"] else cat_to_label[a["category_id"]]
        assert np.array_equal(sem, syn.coco_semantic_mask(scene))
    assert (root / "annotations/instances_val2014.json").exists()
