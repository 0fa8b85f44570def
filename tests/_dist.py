"""Run a function on N local processes joined by a gloo process group (no Ray needed)."""

from __future__ import annotations

import os
import socket

import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, port: int, fn, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, out)
    finally:
        dist.destroy_process_group()


def spawn_gloo(fn, world: int = 2) -> dict:
    """``fn(rank, out)`` on ``world`` processes; returns what they put into ``out``.
    ``fn`` must be a module-level function (it is pickled by reference)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_entry, args=(world, port, fn, out), nprocs=world, join=True)
    return dict(out)
