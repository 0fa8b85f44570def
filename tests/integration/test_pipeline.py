"""Ray Data pipeline: expected tensors out; planted corrupt samples skipped with the right count."""

from __future__ import annotations

import numpy as np

from wsss_ray.data import synthetic as syn
from wsss_ray.data.webdataset import image_text_dataset

SOT = 49406  # open_clip's start-of-text token


def test_pipeline_tensors_and_skip_count(ray_local, corrupt_shards):
    ds = image_text_dataset(corrupt_shards, "wsss-tiny", image_size=48, batch_size=8, actors=(1, 1))
    images, texts, skipped = [], [], 0
    for batch in ds.iter_torch_batches(batch_size=4):
        assert set(batch) == {"image", "text", "skipped"}
        images.append(batch["image"])
        texts.append(batch["text"])
        skipped += int(batch["skipped"].sum())
    import torch

    images, texts = torch.cat(images), torch.cat(texts)
    assert len(images) == 4 + 3  # good samples of A, survivors of B
    assert skipped == 3 + 1  # bad JPEG, missing and empty caption; one truncated tail
    assert images.dtype == torch.uint8 and images.shape[1:] == (48, 48, 3)
    assert texts.dtype == torch.int64 and texts.shape[1] == 32
    assert (texts[:, 0] == SOT).all()
    # crops come from real scenes: textured, not constant
    assert float(images.float().std()) > 10


def test_pipeline_reads_directory_of_synthetic_shards(ray_local, tmp_path):
    paths = syn.write_webdataset(tmp_path, 20, seed=0, size=64, samples_per_shard=8)
    ds = image_text_dataset(paths, "wsss-tiny", image_size=32, batch_size=16, actors=(1, 1))
    rows = ds.take_all()
    assert len(rows) == 20 and sum(int(r["skipped"]) for r in rows) == 0
    assert np.asarray(rows[0]["image"]).shape == (32, 32, 3)
