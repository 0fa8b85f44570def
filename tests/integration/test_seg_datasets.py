"""Segmentation data through Ray Data: the dataset rows and the sharded form
(``make_shards.py --segmentation``) both give back the source's images, masks and labels."""

from __future__ import annotations

import json

import numpy as np

from jobs import make_shards
from wsss_ray.data import synthetic as syn
from wsss_ray.data.segmentation import (
    decode_mask_bytes,
    open_source,
    read_mask,
    read_segmentation_shards,
    segmentation_dataset,
)


def _by_id(rows):
    return {str(r["id"]): r for r in rows}


def test_dataset_and_shards_round_trip(ray_local, tmp_path):
    root = syn.write_voc(tmp_path / "VOC2012", 2, 6, seed=4, size=48)
    source = open_source("voc", root, "val")
    rows = _by_id(segmentation_dataset(source).take_all())
    assert set(rows) == {r.id for r in source.records}
    for rec in source.records:
        row = rows[rec.id]
        np.testing.assert_array_equal(decode_mask_bytes(row["mask"]), read_mask(rec.mask))
        assert bytes(row["image"]) == open(rec.image, "rb").read()
        assert json.loads(row["labels"]) == [
            int(v) for v in np.unique(read_mask(rec.mask)) if v not in (0, 255)
        ]

    out = tmp_path / "shards"
    argv = ["--segmentation", "voc", "--root", str(root), "--split", "val", "--out", str(out)]
    assert make_shards.main([*argv, "--samples-per-shard", "4"]) == 0
    tars = sorted(str(p) for p in out.glob("*.tar"))
    assert len(tars) == 2
    assert (out / "class_names.txt").read_text().split() == syn.CLASS_NAMES
    sharded = _by_id(read_segmentation_shards(tars).take_all())
    assert set(sharded) == set(rows)
    for key, row in rows.items():
        assert bytes(sharded[key]["image"]) == bytes(row["image"])
        np.testing.assert_array_equal(
            decode_mask_bytes(sharded[key]["mask"]), decode_mask_bytes(row["mask"])
        )
        assert sharded[key]["labels"] == row["labels"]
