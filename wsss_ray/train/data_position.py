"""The train worker's side of exact mid-epoch resume (:mod:`wsss_ray.data.position`).

:class:`DataPosition` records the ids of the batches this worker consumed in the current Ray
Data execution, writes them into every checkpoint, and on resume hands the union of every old
rank's record to the run's data plan before the first execution starts, so the decode actors
pass over exactly what was consumed. Without a data plan (a task whose reader records no ids,
``data.exact_resume=false``, the ``read_webdataset`` reader) every method does nothing.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
import torch.distributed as dist

from wsss_ray.data.position import Consumed, Position, count, plan_handle, save_position

#: the audit folder (``data.record_samples``) under the run's storage
SAMPLES_DIR = "samples"


class DataPosition:
    """One per train worker; ``plan`` is the name of the run's data plan actor (or None)."""

    def __init__(self, plan: str | None, cfg: Any, storage: str, rank: int, world: int) -> None:
        self.plan, self.rank, self.world, self.storage = plan, rank, world, storage
        self.record_samples = bool(getattr(cfg.data, "record_samples", False))
        self.consumed: Consumed | None = None
        self.pending: Position | None = None  # what the next execution passes over
        if plan:
            import ray

            digest, n_shards = ray.get(plan_handle(plan).info.remote())
            self.consumed = Consumed(digest, n_shards)

    def resume(self, position: Position | None, epoch: int) -> str:
        """Every rank, after loading a checkpoint: adopt its position when it belongs to this
        execution and shard list (rank 0 carries the consumed ranges on); returns a line for
        the console ('' when there is nothing)."""
        if self.consumed is None or position is None:
            return ""
        if (position.digest, position.n_shards) != (self.consumed.digest, self.consumed.n_shards):
            return (
                "warning: the shard list changed since the checkpoint: the interrupted "
                f"epoch {epoch} restarts from its beginning"
            )
        if position.epoch != epoch:
            return ""
        if self.rank == 0:
            self.consumed.inherited = position.ranges
        self.pending = position
        return (
            f"data: resuming mid-epoch: {count(position.ranges)} samples consumed in this "
            f"execution (from epoch {epoch}) are passed over"
        )

    def begin_execution(self) -> bool:
        """Before every execution: rank 0 sets the plan (the resumed position the first time,
        nothing after), then every rank waits for it, so no decode actor starts early. True
        when this execution is a resumed one (which may have too little left for a batch)."""
        if self.consumed is None:
            return False
        pos, self.pending = self.pending, None
        if self.rank == 0:
            import ray

            ranges, sizes = (pos.ranges, pos.sizes) if pos is not None else (None, None)
            ray.get(plan_handle(self.plan).set.remote(ranges, sizes))
        if dist.is_initialized() and self.world > 1:
            dist.barrier()
        return pos is not None

    def add(self, ids: Any, epoch: int) -> None:
        if self.consumed is not None and ids is not None:
            self.consumed.add(ids, epoch if self.record_samples else None)

    def save(self, folder: str, epoch: int) -> None:
        """This rank's position file in a checkpoint folder (rank 0 adds the shard sizes)."""
        if self.consumed is None:
            return
        sizes = None
        if self.rank == 0:
            import ray

            sizes = ray.get(plan_handle(self.plan).sizes.remote())
        save_position(folder, self.rank, self.consumed.position(epoch, sizes))

    def record(self, step: int) -> None:
        """``data.record_samples``: the (execution epoch, sample id) rows consumed since the
        last report, as ``samples/rank<r>-step<step>.npy`` in the run's storage."""
        if self.consumed is None or not self.record_samples:
            return
        import pyarrow.fs as pafs

        rows = self.consumed.take_window()
        fs, root = pafs.FileSystem.from_uri(self.storage)
        folder = os.path.join(root, SAMPLES_DIR)
        fs.create_dir(folder, recursive=True)
        name = f"rank{self.rank}-step{step:08d}-{os.getpid()}.npy"
        buf = io.BytesIO()
        np.save(buf, rows)
        with fs.open_output_stream(os.path.join(folder, name)) as f:
            f.write(buf.getvalue())

    def end_execution(self) -> None:
        if self.consumed is not None:
            self.consumed.reset()
