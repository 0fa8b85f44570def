"""Segmentation data through Ray Data: the dataset rows and the sharded form
(``make_shards.py --segmentation``) both give back the source's images, masks and labels."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from jobs import make_shards
from wsss_ray.data import synthetic as syn
from wsss_ray.data.segmentation import (
    SegRecord,
    decode_mask_bytes,
    read_mask,
    read_segmentation_shards,
    segmentation_dataset,
    write_segmentation_shards,
)
from wsss_ray.data.voc import voc_source


def _by_id(rows):
    return {r["id"]: r for r in rows}


def test_dataset_and_shards_round_trip(ray_local, tmp_path):
    root = syn.write_voc(tmp_path / "VOC2012", 2, 6, seed=4, size=48)
    source = voc_source(root, "val")
    ds = segmentation_dataset(source, override_num_blocks=2)
    assert ds.schema().names == ["id", "image", "mask", "labels"]
    rows = _by_id(ds.take_all())
    assert set(rows) == {r.id for r in source.records}
    for i, rec in zip(range(2, 8), source.records):
        row = rows[rec.id]
        mask = decode_mask_bytes(row["mask"])
        np.testing.assert_array_equal(mask, syn.with_boundaries(syn.make_scene(i, 4, 48).mask))
        np.testing.assert_array_equal(mask, read_mask(rec.mask))
        assert bytes(row["image"]) == Path(rec.image).read_bytes()
        assert list(row["labels"]) == syn.make_scene(i, 4, 48).labels
    assert [r["id"] for r in segmentation_dataset(source, limit=2).take_all()] == [
        r.id for r in source.records[:2]
    ]

    out = tmp_path / "shards"
    argv = ["--segmentation", "voc", "--root", str(root), "--split", "val", "--out", str(out)]
    assert make_shards.main([*argv, "--samples-per-shard", "4"]) == 0
    tars = sorted(str(p) for p in out.glob("*.tar"))
    assert len(tars) == 2
    assert (out / "class_names.txt").read_text().split() == syn.CLASS_NAMES
    sharded_ds = read_segmentation_shards(tars)
    assert sharded_ds.schema().names == ["id", "image", "mask", "labels"]
    sharded = _by_id(sharded_ds.take_all())
    assert set(sharded) == set(rows)
    for key, row in rows.items():
        assert bytes(sharded[key]["image"]) == bytes(row["image"])
        np.testing.assert_array_equal(
            decode_mask_bytes(sharded[key]["mask"]), decode_mask_bytes(row["mask"])
        )
        assert list(sharded[key]["labels"]) == list(row["labels"])


def test_shards_keep_ids_that_are_not_tar_keys(ray_local, tmp_path):
    root = syn.write_voc(tmp_path / "VOC2012", 0, 3, size=32)
    source = voc_source(root, "val")
    odd = [replace(r, id=f"img.{i}/v2") for i, r in enumerate(source.records)]
    tars = write_segmentation_shards(
        replace(source, records=[*odd, SegRecord("plain", odd[0].image, odd[0].mask)]),
        tmp_path / "shards",
        progress=False,
    )
    got = _by_id(read_segmentation_shards(tars).take_all())
    assert sorted(got) == sorted([*(r.id for r in odd), "plain"])
    for rec in odd:
        np.testing.assert_array_equal(decode_mask_bytes(got[rec.id]["mask"]), read_mask(rec.mask))
