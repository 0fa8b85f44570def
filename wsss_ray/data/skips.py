"""Counting skipped samples exactly across a whole Ray Data pipeline.

Decode actors drop what they cannot read (a bad JPEG, a missing caption, the tail of a truncated
tar). A per-row count column undercounts: a batch with nothing decodable has no row to carry it,
and rows dropped by ``drop_last`` or the split across workers take their counts with them. So
each decoder also adds its skips to one small named actor per training run, and rank 0 reads the
total when it reports ``data/skipped``.
"""

from __future__ import annotations

import uuid
from typing import Any

NAMESPACE = "wsss_ray"
#: the driver keeps its counters' handles: a non-detached actor dies with its last handle
_LIVE: dict[str, Any] = {}


class _Counter:
    def __init__(self) -> None:
        self.n = 0

    def add(self, n: int) -> None:
        self.n += int(n)

    def total(self) -> int:
        return self.n


def start_skip_counter(prefix: str = "wsss_skips") -> str:
    """Create the counter actor (0 CPUs) for this driver; returns its name for the decoders."""
    import ray

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    _LIVE[name] = ray.remote(num_cpus=0)(_Counter).options(name=name, namespace=NAMESPACE).remote()
    return name


class SkipReporter:
    """Used inside a decoder: ``add(n)`` sends n skips to the named counter (nothing when the
    name is None, e.g. a dataset used outside a training run)."""

    def __init__(self, name: str | None):
        self.name = name
        self._handle = None

    def add(self, n: int) -> None:
        if not n or not self.name:
            return
        if self._handle is None:
            import ray

            self._handle = ray.get_actor(self.name, namespace=NAMESPACE)
        self._handle.add.remote(int(n))


def read_skips(name: str) -> int:
    import ray

    return int(ray.get(ray.get_actor(name, namespace=NAMESPACE).total.remote()))
