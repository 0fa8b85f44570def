"""Exact mid-epoch resume, the parts that need no Ray cluster: sample ids, ranges, the saved
position of several ranks, and the fused decoder passing over the consumed samples (and not
opening a shard known to be fully consumed). The kill/resume run is
tests/integration/test_exact_resume.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsss_ray.data import synthetic as syn
from wsss_ray.data.position import (
    MAX_INDEX,
    Consumed,
    Position,
    count,
    epochs_of,
    load_positions,
    merge_ranges,
    pack,
    save_position,
    shard_ranges,
    to_ranges,
    unpack,
)
from wsss_ray.data.shard_reading import resolve_shards, shard_schedule
from wsss_ray.data.webdataset import FusedShardDecoder


def test_ids_pack_and_unpack():
    ids = pack(2, 7, 10, np.array([0, 5, MAX_INDEX - 1]))
    p, s, i = unpack(ids, 10)
    assert p.tolist() == [2, 2, 2] and s.tolist() == [7, 7, 7]
    assert i.tolist() == [0, 5, MAX_INDEX - 1]
    # distinct (pass, shard, index) -> distinct ids, in (pass, shard, index) order
    all_ids = [int(pack(p, s, 4, i)) for p in range(2) for s in range(4) for i in range(3)]
    assert all_ids == sorted(set(all_ids))
    with pytest.raises(ValueError, match="more than"):
        pack(0, 0, 1, MAX_INDEX)


def test_ranges_union_and_count():
    r = to_ranges(np.array([5, 3, 4, 9, 10, 4, 20]))
    assert r.tolist() == [[3, 6], [9, 11], [20, 21]] and count(r) == 6
    assert to_ranges(np.array([], np.int64)).shape == (0, 2)
    m = merge_ranges(r, np.array([[6, 9], [30, 32]]), np.zeros((0, 2), np.int64))
    assert m.tolist() == [[3, 11], [20, 21], [30, 32]] and count(m) == 11
    # one shard's ranges as indices in its tar
    ids = np.concatenate([pack(0, 1, 3, np.arange(2, 6)), pack(0, 2, 3, np.arange(0, 3))])
    ranges = to_ranges(ids)
    assert shard_ranges(ranges, 0, 1, 3).tolist() == [[2, 6]]
    assert shard_ranges(ranges, 0, 2, 3).tolist() == [[0, 3]]
    assert shard_ranges(ranges, 1, 1, 3).shape == (0, 2)


def test_positions_of_every_rank_merge(tmp_path):
    a = Position(3, "abc", 5, to_ranges(pack(0, 1, 5, np.arange(4))), np.array([4, -1, 2, 0, 1]))
    b = Position(3, "abc", 5, to_ranges(pack(1, 2, 5, np.arange(3))), np.array([-1, 8, 2, 0, -1]))
    assert Position.from_bytes(a.to_bytes()).ranges.tolist() == a.ranges.tolist()
    save_position(str(tmp_path), 0, a)
    save_position(str(tmp_path), 1, b)
    merged = load_positions(str(tmp_path))
    assert (merged.epoch, merged.digest, merged.n_shards) == (3, "abc", 5)
    assert count(merged.ranges) == 7 and merged.sizes.tolist() == [4, 8, 2, 0, 1]
    save_position(str(tmp_path), 2, Position(4, "abc", 5))  # another execution: no position
    assert load_positions(str(tmp_path)) is None
    assert load_positions(str(tmp_path / "none")) is None


def test_consumed_record_and_window():
    c = Consumed("d", 4)
    c.inherited = to_ranges(pack(0, 0, 4, np.arange(3)))
    c.add(torch.as_tensor(pack(0, 1, 4, np.arange(2))), record_epoch=6)
    c.add(torch.as_tensor(pack(1, 3, 4, np.arange(2, 4))), record_epoch=6)
    pos = c.position(6)
    assert count(pos.ranges) == 7 and pos.epoch == 6
    rows = c.take_window()
    assert rows.shape == (4, 2) and epochs_of(rows, 4).tolist() == [6, 6, 7, 7]
    assert c.take_window().shape == (0, 2)
    c.reset()
    assert count(c.position(8).ranges) == 0


class _CountingFs:
    """The local filesystem, counting the tars opened."""

    def __init__(self, fs):
        self.fs, self.opened = fs, []

    def open_input_stream(self, path):
        self.opened.append(path)
        return self.fs.open_input_stream(path)


def _ids(batches):
    return sorted(int(i) for b in batches for i in b["sample_id"])


def test_fused_decoder_passes_over_consumed_samples(tmp_path):
    paths = syn.ensure_synthetic_shards(tmp_path, 24, seed=1, size=32, samples_per_shard=8)
    tars, fs = resolve_shards(paths)
    counting = _CountingFs(fs)
    kw = {"tokenizer_name": "wsss-tiny", "image_size": 16, "crop_scale": (1, 1), "hflip": False}
    dec = FusedShardDecoder(counting, 5, n_shards=len(tars), **kw)
    pass_of, idx = shard_schedule(len(tars), passes=2, seed=0)
    rows = {"path": np.array([tars[i] for i in idx], object), "shard": idx, "pass": pass_of}
    every = _ids(dec(rows))
    assert len(every) == 48 == len(set(every))  # 24 samples x 2 passes, one id each
    p, s, i = unpack(np.array(every), len(tars))
    assert sorted(set(zip(p.tolist(), s.tolist()))) == [(a, b) for a in (0, 1) for b in (0, 1, 2)]
    assert sorted(set(i.tolist())) == list(range(8))
    # a resume: shard 1 of pass 0 fully consumed, half of shard 2 of pass 1
    done = np.concatenate([pack(0, 1, 3, np.arange(8)), pack(1, 2, 3, np.arange(0, 8, 2))])
    dec.plan.ranges = to_ranges(done)
    dec.plan.sizes = {1: 8}
    counting.opened.clear()
    rest = _ids(dec(rows))
    assert sorted(set(rest) | set(done.tolist())) == every and not set(rest) & set(done.tolist())
    assert len(rest) == 48 - 12
    assert counting.opened.count(tars[1]) == 1  # pass 1 only: pass 0's copy is not opened
    assert all(int(b["skipped"].sum()) == 0 for b in dec(rows))  # passed over is not skipped
