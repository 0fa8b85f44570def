"""Exact, elastic mid-epoch resume of the fused image-text reader.

Ray Data cannot resume a streaming read (ray-project/ray #37633, #48224), and its interleaving
of decode actors and train workers is dynamic, so the data position cannot be one cursor. It is
recorded by sample identity instead:

- every sample the fused reader emits carries a ``sample_id``: ``(pass, shard, index)`` packed in
  one int64 (:func:`pack`), where ``shard`` is the tar's index in the run's resolved shard list,
  ``pass`` the epoch within the Ray Data execution and ``index`` the sample's place in its tar.
  Which samples an epoch holds, and the shard order of each pass, are pure functions of
  ``(train.seed, pass, shard list)`` (:func:`wsss_ray.data.shard_reading.shard_order`);
- each train worker keeps the ids of the batches it consumed since the execution began; every
  checkpoint stores them per rank as sorted ``[start, end)`` ranges (:func:`to_ranges`: a decode
  batch comes from one shard in tar order, so the ranges are few), with the execution's first
  epoch, a digest of the shard list and the sample count of every shard read so far;
- on resume, the union of every rank's ranges (any old world size) goes to a small named actor
  (:class:`DataPlan`); the decode actors of the next execution ask it which samples to pass over
  (not decoded; a shard known to be fully consumed is not opened), so the interrupted epoch goes
  on with exactly the samples not yet consumed, whatever the new number of workers.

Samples in flight (decoded or prefetched, not yet stepped on) at a checkpoint are not recorded:
they come again after a resume, as they must. Samples that ``drop_last`` or the equal split
leave over at the end of an execution are not seen in that epoch, as with any ``DataLoader``.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from wsss_ray.data.skips import run_actor, start_run_actor

#: bits of the sample index inside its tar (16.7M samples per shard at most)
INDEX_BITS = 24
MAX_INDEX = 1 << INDEX_BITS
POSITION_FILE = "data_position_rank{rank}.npz"


def pack(pass_: int, shard: int, n_shards: int, index: np.ndarray | int) -> np.ndarray:
    """The sample ids of ``index`` (int or array) in shard ``shard`` of pass ``pass_``."""
    idx = np.asarray(index, dtype=np.int64)
    if idx.size and int(idx.max()) >= MAX_INDEX:
        raise ValueError(f"a shard holds more than {MAX_INDEX} samples: split it")
    return ((np.int64(pass_) * n_shards + shard) << INDEX_BITS) | idx


def unpack(ids: np.ndarray, n_shards: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pass, shard, index) arrays of packed ids."""
    ids = np.asarray(ids, dtype=np.int64)
    unit = ids >> INDEX_BITS
    return unit // n_shards, unit % n_shards, ids & (MAX_INDEX - 1)


def to_ranges(ids: np.ndarray) -> np.ndarray:
    """Ids (any order, repeats allowed) -> K x 2 sorted, disjoint ``[start, end)`` ranges."""
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    if not ids.size:
        return np.zeros((0, 2), np.int64)
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    starts = ids[np.r_[0, breaks]]
    ends = ids[np.r_[breaks - 1, ids.size - 1]] + 1
    return np.stack([starts, ends], 1)


def merge_ranges(*parts: np.ndarray) -> np.ndarray:
    """The union of several range arrays, as sorted disjoint ranges (touching ones joined)."""
    r = np.concatenate([np.asarray(p, np.int64).reshape(-1, 2) for p in parts])
    if not len(r):
        return np.zeros((0, 2), np.int64)
    r = r[np.argsort(r[:, 0], kind="stable")]
    reach = np.maximum.accumulate(r[:, 1])  # the furthest end so far
    new = np.r_[True, r[1:, 0] > reach[:-1]]  # a range that starts past it opens a new one
    starts = r[new, 0]
    ends = reach[np.r_[np.flatnonzero(new)[1:] - 1, len(r) - 1]]
    return np.stack([starts, ends], 1)


def count(ranges: np.ndarray) -> int:
    """Ids covered by ``ranges``."""
    r = np.asarray(ranges, np.int64).reshape(-1, 2)
    return int((r[:, 1] - r[:, 0]).sum())


def shard_ranges(ranges: np.ndarray, pass_: int, shard: int, n_shards: int) -> np.ndarray:
    """The ranges of one (pass, shard), as sample indices in its tar."""
    base = int(pack(pass_, shard, n_shards, 0))
    r = np.asarray(ranges, np.int64).reshape(-1, 2)
    lo = np.searchsorted(r[:, 1], base, side="right")
    hi = np.searchsorted(r[:, 0], base + MAX_INDEX, side="left")
    part = r[lo:hi] - base
    return np.clip(part, 0, MAX_INDEX)


def digest(shards: list[str]) -> str:
    """A short digest of the resolved shard list: positions only apply to the same list."""
    return hashlib.sha1("\n".join(shards).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------- the saved position
@dataclass
class Position:
    """What a checkpoint records of the data stream: ``epoch`` is the first epoch of the Ray
    Data execution it was in, ``ranges`` the consumed sample ids of that execution, ``sizes``
    the sample count of every shard read so far (-1: not yet known)."""

    epoch: int
    digest: str
    n_shards: int
    ranges: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    sizes: np.ndarray | None = None

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        arrays = {"ranges": self.ranges, "epoch": np.int64(self.epoch)}
        arrays["n_shards"] = np.int64(self.n_shards)
        arrays["digest"] = np.frombuffer(self.digest.encode(), np.uint8)
        if self.sizes is not None:
            arrays["sizes"] = np.asarray(self.sizes, np.int64)
        np.savez(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Position:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return cls(
                epoch=int(z["epoch"]),
                digest=z["digest"].tobytes().decode(),
                n_shards=int(z["n_shards"]),
                ranges=z["ranges"].reshape(-1, 2).astype(np.int64),
                sizes=z["sizes"].astype(np.int64) if "sizes" in z.files else None,
            )


def save_position(folder: str, rank: int, position: Position) -> str:
    """Write one rank's position file into a checkpoint folder; returns its path."""
    import os

    path = os.path.join(folder, POSITION_FILE.format(rank=rank))
    with open(path, "wb") as f:
        f.write(position.to_bytes())
    return path


def load_positions(folder: str) -> Position | None:
    """The merged position of every rank's file in a checkpoint folder (any old world size),
    or None when there is none (a checkpoint written without one) or they disagree."""
    import glob
    import os

    files = sorted(glob.glob(os.path.join(folder, POSITION_FILE.format(rank="*"))))
    if not files:
        return None
    parts = []
    for path in files:
        with open(path, "rb") as f:
            parts.append(Position.from_bytes(f.read()))
    first = parts[0]
    if any(
        (p.epoch, p.digest, p.n_shards) != (first.epoch, first.digest, first.n_shards)
        for p in parts
    ):
        return None
    sizes = None
    known = [p.sizes for p in parts if p.sizes is not None]
    if known:
        sizes = np.max(np.stack(known), 0)
    return Position(
        first.epoch, first.digest, first.n_shards, merge_ranges(*[p.ranges for p in parts]), sizes
    )


# --------------------------------------------------------------------- the run's data plan
class DataPlan:
    """One per training driver (a 0-CPU named actor): the shard list's digest and length (set
    where the dataset is built), the consumed ranges the next execution passes over (set by
    rank 0 before it starts, cleared for the executions after) and the sample count of every
    shard the decoders have read."""

    def __init__(self) -> None:
        self.digest, self.n_shards = "", 0
        self.ranges = np.zeros((0, 2), np.int64)
        self.version = 0
        self.shard_sizes: dict[int, int] = {}

    def configure(self, shard_digest: str, n_shards: int) -> None:
        self.digest, self.n_shards = shard_digest, int(n_shards)

    def info(self) -> tuple[str, int]:
        return self.digest, self.n_shards

    def set(self, ranges: np.ndarray | None, sizes: np.ndarray | None = None) -> int:
        self.ranges = np.zeros((0, 2), np.int64) if ranges is None else np.asarray(ranges)
        for shard, n in enumerate(np.asarray(sizes if sizes is not None else [], np.int64)):
            if n >= 0:
                self.add_size(shard, int(n))
        self.version += 1
        return self.version

    def get(self) -> tuple[int, np.ndarray, dict[int, int]]:
        return self.version, self.ranges, dict(self.shard_sizes)

    def current(self) -> int:
        return self.version

    def add_size(self, shard: int, n: int) -> None:
        self.shard_sizes[int(shard)] = max(self.shard_sizes.get(int(shard), -1), int(n))

    def sizes(self) -> np.ndarray:
        """Sample count per shard, -1 where no decoder has read it yet."""
        out = np.full(self.n_shards, -1, np.int64)
        for shard, n in self.shard_sizes.items():
            if shard < self.n_shards:
                out[shard] = n
        return out


def start_data_plan(prefix: str = "wsss_data_plan") -> str:
    """Create the plan actor for this driver; returns its name (for decoders and workers)."""
    return start_run_actor(DataPlan, prefix)


#: the handle of the run's data-plan actor, from its name
plan_handle = run_actor


class PlanReader:
    """Used inside a decode actor: which samples of a (pass, shard) to pass over, from the
    plan's current version (re-read when rank 0 changes it, i.e. once per execution)."""

    def __init__(self, name: str | None, n_shards: int) -> None:
        self.name, self.n_shards = name, n_shards
        self._handle = None
        self.version = -1
        self.ranges = np.zeros((0, 2), np.int64)
        self.sizes: dict[int, int] = {}

    def refresh(self) -> None:
        if not self.name:
            return
        import ray

        if self._handle is None:
            self._handle = plan_handle(self.name)
        if ray.get(self._handle.current.remote()) != self.version:
            self.version, self.ranges, self.sizes = ray.get(self._handle.get.remote())

    def consumed(self, pass_: int, shard: int) -> np.ndarray:
        """Index ranges of that tar already consumed in this execution's resumed epoch."""
        if not len(self.ranges):
            return np.zeros((0, 2), np.int64)
        return shard_ranges(self.ranges, pass_, shard, self.n_shards)

    def fully_consumed(self, pass_: int, shard: int) -> bool:
        n = self.sizes.get(int(shard), -1)
        if n < 0:
            return False
        r = self.consumed(pass_, shard)
        return n == 0 or (len(r) == 1 and r[0, 0] == 0 and r[0, 1] >= n)

    def report_size(self, shard: int, n: int) -> None:
        if self._handle is not None and self.sizes.get(int(shard)) != n:
            self.sizes[int(shard)] = int(n)
            self._handle.add_size.remote(int(shard), int(n))


# ---------------------------------------------------------------------- on the train worker
class Consumed:
    """A train worker's record of the sample ids it consumed since its execution began:
    ``add`` each batch's ids (device tensors, no sync), ``position`` at a checkpoint,
    ``take_window`` for the audit (``data.record_samples``), ``reset`` when an execution ends.
    ``inherited``: ranges consumed before a resume (rank 0 carries them on, so a second
    interruption still knows them)."""

    def __init__(self, shard_digest: str, n_shards: int) -> None:
        self.digest, self.n_shards = shard_digest, n_shards
        self.inherited = np.zeros((0, 2), np.int64)
        self.own = np.zeros((0, 2), np.int64)
        self.parts: list[Any] = []
        self.window: list[Any] = []

    def add(self, ids: Any, record_epoch: int | None = None) -> None:
        """One batch's ids; ``record_epoch``: also keep them for :meth:`take_window`, with the
        first epoch of their execution."""
        ids = ids.detach()
        self.parts.append(ids)
        if record_epoch is not None:
            self.window.append((record_epoch, ids))

    def _flush(self) -> None:
        if self.parts:
            import torch

            ids = torch.cat([p.reshape(-1) for p in self.parts]).cpu().numpy()
            self.own = merge_ranges(self.own, to_ranges(ids))
            self.parts = []

    def position(self, epoch: int, sizes: np.ndarray | None = None) -> Position:
        self._flush()
        ranges = merge_ranges(self.inherited, self.own)
        return Position(epoch, self.digest, self.n_shards, ranges, sizes)

    def take_window(self) -> np.ndarray:
        """N x 2 rows (first epoch of the execution, sample id) of the ids added with a
        ``record_epoch`` since the last call, in the order consumed."""
        import torch

        if not self.window:
            return np.zeros((0, 2), np.int64)
        ids = torch.cat([w.reshape(-1) for _, w in self.window]).cpu().numpy()
        epochs = np.concatenate([np.full(w.numel(), e, np.int64) for e, w in self.window])
        self.window = []
        return np.stack([epochs, ids], 1)

    def reset(self) -> None:
        self._flush()
        self.inherited = np.zeros((0, 2), np.int64)
        self.own = np.zeros((0, 2), np.int64)


def epochs_of(rows: np.ndarray, n_shards: int) -> np.ndarray:
    """The epoch of each (first epoch of the execution, sample id) row of a record."""
    rows = np.asarray(rows, np.int64).reshape(-1, 2)
    return rows[:, 0] + unpack(rows[:, 1], n_shards)[0]
