"""The fused reader (``data.reader=fused``): the decode actors read their own tars. Same samples
as the ``read_webdataset`` path; truncated tars, bad images and empty captions skipped and
counted; the shard order reshuffled per execution; ``data.reader`` validated."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from wsss_ray.config import ConfigError, PGSegPretrainConfig, load_config
from wsss_ray.data import synthetic as syn
from wsss_ray.data.shard_reading import resolve_shards, shard_order, shard_path_dataset
from wsss_ray.data.webdataset import TRUNCATED_KEY, FusedShardDecoder, image_text_dataset

TINY = "configs/pgseg/tiny.yaml"


def _kwargs(**over):
    kw = {
        "tokenizer_name": "wsss-tiny",
        "image_size": 32,
        "crop_scale": (1.0, 1.0),  # the whole image, resized: no random crop ...
        "hflip": False,  # ... and no flip, so both readers give the same pixels
    }
    kw.update(over)
    return kw


def _samples(rows):
    """Order-free fingerprint of the output rows: sorted (tokens, pixels) pairs."""
    return sorted((np.asarray(r["text"]).tobytes(), np.asarray(r["image"]).tobytes()) for r in rows)


# ---------------------------------------------------------------------- no Ray cluster needed
def test_fused_decoder_batches_and_counts_without_ray(corrupt_shards):
    tars, fs = resolve_shards([str(p) for p in corrupt_shards])
    assert [t.rsplit("/", 1)[-1] for t in tars] == ["a-000000.tar", "b-000000.tar"]
    fused = FusedShardDecoder(fs, batch_size=3, **_kwargs())
    out = list(fused({"path": np.array(tars, dtype=object)}))
    # batches of at most 3 input rows per shard (A: 3 + 3 + 1; B: its samples + the marker)
    kept = [len(b["image"]) for b in out]
    skipped = [int(b["skipped"].sum()) for b in out]
    assert sum(kept) == 4 + 3 and sum(skipped) == 3 + 1
    assert all(set(b) == {"image", "text", "skipped"} for b in out)
    assert all(b["image"].dtype == np.uint8 and b["image"].shape[1:] == (32, 32, 3) for b in out)
    # the truncation marker rides in shard B's last batch, so its skip lands in a column
    assert skipped[-1] >= 1 and kept[-1] >= 1
    samples_b = list(fused.samples(tars[1]))
    assert [s["__key__"] for s in samples_b][-1] == TRUNCATED_KEY
    assert sum("jpg" in s and "txt" in s for s in samples_b) == 3


def test_fused_decoder_gpu_columns(corrupt_shards):
    tars, fs = resolve_shards(corrupt_shards)
    out = list(FusedShardDecoder(fs, 256, **_kwargs(decode_on_worker=True))({"path": tars}))
    assert all(set(b) == {"jpeg", "crop", "flip", "text", "skipped"} for b in out)
    assert sum(len(b["jpeg"]) for b in out) == 7 and sum(int(b["skipped"].sum()) for b in out) == 4
    assert all(b["crop"].shape[1:] == (4,) for b in out)


def test_reader_config_is_validated():
    assert load_config(PGSegPretrainConfig, TINY, ["data.reader=fused"]).data.reader == "fused"
    with pytest.raises(ConfigError, match="data.reader: fused | read_webdataset"):
        load_config(PGSegPretrainConfig, TINY, ["data.reader=tar"])
    with pytest.raises(ValueError, match="reader must be one of"):
        image_text_dataset(["x.tar"], "wsss-tiny", 32, reader="tar")
    cfg = load_config(PGSegPretrainConfig, TINY, ["data.passes_per_execution=3"])
    assert cfg.data.passes_per_execution == 3
    with pytest.raises(ConfigError, match="data.passes_per_execution: must be >= 1"):
        load_config(PGSegPretrainConfig, TINY, ["data.passes_per_execution=0"])
    with pytest.raises(ConfigError, match="data.passes_per_execution: needs data.reader=fused"):
        load_config(
            PGSegPretrainConfig,
            TINY,
            ["data.passes_per_execution=2", "data.reader=read_webdataset"],
        )
    with pytest.raises(ValueError, match="needs the fused reader"):
        image_text_dataset(["x.tar"], "wsss-tiny", 32, reader="read_webdataset", passes=2)


# ------------------------------------------------------------------------- on a local Ray
def test_fused_equals_read_webdataset_and_counts_skips(ray_local, tmp_path, corrupt_shards):
    import time

    from wsss_ray.data.skips import read_skips, start_skip_counter

    good = syn.write_webdataset(tmp_path / "good", 14, seed=1, size=64, samples_per_shard=6)
    inputs = [str(tmp_path / "good"), *corrupt_shards]  # a directory and two files
    got, column, counted = {}, {}, {}
    for reader in ("read_webdataset", "fused"):
        counter = start_skip_counter("test_fused")
        ds = image_text_dataset(
            inputs,
            **_kwargs(),
            batch_size=8,
            actors=(1, 1),
            reader=reader,
            shuffle_files=False,
            skip_counter=counter,
        )
        rows = ds.take_all()
        got[reader] = rows
        column[reader] = sum(int(r["skipped"]) for r in rows)
        deadline = time.monotonic() + 20  # the decoders' adds are fire-and-forget
        while read_skips(counter) < 4 and time.monotonic() < deadline:
            time.sleep(0.2)
        counted[reader] = read_skips(counter)
    assert len(good) == 3
    assert len(got["fused"]) == len(got["read_webdataset"]) == 14 + 4 + 3
    # exact counts (what the training loop reads): bad image, no caption, empty caption; the cut
    assert counted == {"read_webdataset": 4, "fused": 4}
    # the skipped column rides on a kept row: the fused reader keeps a shard's truncation marker
    # with its last samples, so the column is exact too; with read_webdataset a batch that keeps
    # no row (the marker alone) loses its count, so there the column is a lower bound
    assert column["fused"] == 4 and column["read_webdataset"] <= 4
    assert _samples(got["fused"]) == _samples(got["read_webdataset"])
    assert all(np.asarray(r["image"]).shape == (32, 32, 3) for r in got["fused"])


def test_shard_order_reshuffled_per_execution(ray_local, tmp_path):
    paths = syn.write_webdataset(tmp_path, 8, seed=2, size=16, samples_per_shard=1)
    ds, _ = shard_path_dataset([str(tmp_path)], shuffle_files=True)
    orders = [[r["path"] for r in ds.iter_rows()] for _ in range(3)]  # three epochs
    assert all(sorted(o) == sorted(paths) for o in orders)
    assert len({tuple(o) for o in orders}) > 1  # all three equal by chance: p = 1 / 8!^2
    ds, _ = shard_path_dataset(paths, shuffle_files=False)
    assert [r["path"] for r in ds.iter_rows()] == sorted(paths)


def test_passes_read_every_shard_n_times_in_one_execution(ray_local, tmp_path):
    paths = syn.write_webdataset(tmp_path, 6, seed=2, size=16, samples_per_shard=2)  # 3 tars
    ds, _ = shard_path_dataset(paths, shuffle_files=True, passes=3)
    order = [r["path"] for r in ds.iter_rows()]
    assert sorted(order) == sorted(paths * 3)
    once = _samples(image_text_dataset(paths, **_kwargs(image_size=16), actors=(1, 1)).take_all())
    ds = image_text_dataset(paths, **_kwargs(image_size=16), batch_size=2, actors=(1, 1), passes=2)
    twice = _samples(ds.take_all())  # one execution, every sample twice (same pixels: no crop)
    assert len(once) == 6 and len(set(once)) == 6
    assert twice == sorted(once * 2)


def test_fused_streaming_split_covers_every_sample(ray_local, tmp_path):
    syn.write_webdataset(tmp_path, 12, seed=2, size=32, samples_per_shard=3)  # 4 shards
    ds = image_text_dataset(
        [str(tmp_path)], **_kwargs(image_size=16), batch_size=2, actors=(1, 1), reader="fused"
    )
    split = ds.streaming_split(2, equal=False)  # two train workers' shards
    seen: list[list[bytes]] = [[], []]

    def drain(i):
        for batch in split[i].iter_batches(batch_size=2):
            seen[i] += [t.tobytes() + im.tobytes() for t, im in zip(batch["text"], batch["image"])]

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(seen[0] + seen[1]) == 12 and len(set(seen[0] + seen[1])) == 12


def test_shard_order_is_a_pure_function_of_seed_and_pass():
    tars = [f"s{i:03d}.tar" for i in range(50)]
    a = shard_order(tars, passes=3, seed=7)
    assert a == shard_order(tars, passes=3, seed=7)  # same arguments, same order
    assert [sorted(a[i * 50 : (i + 1) * 50]) for i in range(3)] == [tars] * 3  # each pass: all
    assert a[:50] != a[50:100] and a[:50] != tars  # passes drawn apart, shuffled
    assert a[:50] == shard_order(tars, passes=1, seed=7)  # pass 0 does not depend on passes
    assert shard_order(tars, passes=3, seed=8)[:50] != a[:50]
    assert shard_order(tars, passes=2, shuffle=False) == tars * 2


def test_many_shards_sit_in_a_few_blocks(ray_local, tmp_path):
    """Start-up independent of the shard count: 3,000 shards x 2 passes in 8 blocks (one block
    per shard cost 1.2 ms and 33 KB each on the driver), every shard twice."""
    for i in range(3000):
        (tmp_path / f"{i:06d}.tar").write_bytes(b"")
    ds, _ = shard_path_dataset([str(tmp_path)], shuffle_files=True, passes=2, num_blocks=8)
    assert ds.materialize().num_blocks() == 8
    rows = [r["path"] for r in ds.iter_rows()]
    assert sorted(rows) == sorted([str(p) for p in tmp_path.glob("*.tar")] * 2)
