"""Counting and naming skipped samples exactly across a whole Ray Data pipeline.

Decode actors drop what they cannot read (a bad JPEG, a missing caption, an image or caption
without its pair, the tail of a truncated tar). A per-row count column undercounts: a batch with
nothing decodable has no row to carry it, and rows dropped by ``drop_last`` or the split across
workers take their counts with them. So each decoder also adds its skips to one small named actor
per training run, and rank 0 reads the total when it reports ``data/skipped``.

Each skip can come with its name, ``"<shard> <key>: <why>"`` (:func:`skip_name`): the counter
keeps the first :data:`MAX_NAMED` of them, and rank 0 prints the ones it has not shown yet under
its report line, so a user sees which shard and sample were dropped, not only how many. The cap
keeps a shard full of bad samples from flooding the console or the actor's memory: beyond it,
skips are counted, not named.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

NAMESPACE = "wsss_ray"
#: skips named per training run (the first ones); later skips are only counted
MAX_NAMED = 100
#: the ``__key__`` of the marker sample a truncated or corrupt tar ends with
#: (:func:`wsss_ray.data.webdataset.iter_tar_samples`)
TRUNCATED_KEY = "__truncated__"
#: captions are cut to this many bytes (UTF-8) when written and when read: the text towers read
#: 77 tokens (~300 characters), and a 1 MB caption costs the tokenizer 0.6 s
MAX_CAPTION_BYTES = 4096
#: the driver keeps its counters' handles: a non-detached actor dies with its last handle
_LIVE: dict[str, Any] = {}


def as_bytes(value: Any) -> bytes | None:
    """A tar member's value as bytes (Arrow hands over bytes or memoryviews); None when the
    sample has no such member."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    return None


class _Counter:
    def __init__(self) -> None:
        self.n = 0
        self.named: list[str] = []
        self._seen: set[str] = set()

    def add(self, n: int, names: list[str] | None = None) -> None:
        """n more skips; their names are kept once each (the same bad sample read again in
        the next epoch is counted again, not named again), up to MAX_NAMED."""
        self.n += int(n)
        for name in names or ():
            if len(self.named) >= MAX_NAMED:
                break
            if name not in self._seen:
                self._seen.add(name)
                self.named.append(name)

    def total(self) -> int:
        return self.n

    def names(self, start: int = 0) -> list[str]:
        return self.named[start:]


def start_run_actor(cls: type, prefix: str) -> str:
    """A small named actor (0 CPUs) of this driver, kept alive by the driver's handle; returns
    its name, which decoders and train workers pass to :func:`run_actor`."""
    import ray

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    _LIVE[name] = ray.remote(num_cpus=0)(cls).options(name=name, namespace=NAMESPACE).remote()
    return name


def run_actor(name: str) -> Any:
    """The handle of an actor :func:`start_run_actor` made."""
    import ray

    return ray.get_actor(name, namespace=NAMESPACE)


def start_skip_counter(prefix: str = "wsss_skips") -> str:
    """Create the counter actor for this driver; returns its name for the decoders."""
    return start_run_actor(_Counter, prefix)


def skip_name(url: Any, key: Any, why: str) -> str:
    """``"<shard> <key>: <why>"``; a truncation marker reads ``"<shard>: <why>"``."""
    shard = "" if url is None else str(url)
    if key is None or str(key) == TRUNCATED_KEY:
        return f"{shard}: {why}"
    return f"{shard} {key}: {why}"


def undecodable(err: Exception) -> str:
    """Why an image did not decode, in words that name no memory address."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(err, UnidentifiedImageError):
        why = "not an image PIL can read"
    elif isinstance(err, Image.DecompressionBombError):
        why = "too many pixels (a decompression bomb?)"
    else:
        why = f"{type(err).__name__}: {err}"
    return f"undecodable image ({why})"


def pair_problem(key: Any, image: bytes | None, caption: bytes | None) -> str | None:
    """Why an image-text sample cannot be used before decoding it, or None: the truncation
    marker, an image without its caption, a caption without its image."""
    if str(key) == TRUNCATED_KEY:
        return "truncated or corrupt tar: the rest of the shard is skipped"
    if image is None and caption is None:
        return "neither .jpg nor .txt"
    if image is None:
        return "caption without its .jpg"
    if caption is None:
        return "image without its .txt"
    return None


class SkipReporter:
    """Used inside a decoder: ``add(n, names)`` sends n skips (and their names, when known) to
    the named counter (nothing when the name is None, e.g. a dataset used outside a training
    run). Names beyond :data:`MAX_NAMED` per decoder are not sent."""

    def __init__(self, name: str | None):
        self.name = name
        self._handle = None
        self._sent_names = 0

    def add(self, n: int, names: Iterable[str] | None = None) -> None:
        if not n or not self.name:
            return
        if self._handle is None:
            self._handle = run_actor(self.name)
        room = MAX_NAMED - self._sent_names
        batch = list(names)[:room] if names is not None and room > 0 else []
        self._sent_names += len(batch)
        if batch:
            self._handle.add.remote(int(n), batch)
        else:
            self._handle.add.remote(int(n))


def read_skips(name: str) -> int:
    import ray

    return int(ray.get(run_actor(name).total.remote()))


def read_skip_names(name: str, start: int = 0) -> list[str]:
    """The named skips from the ``start``-th on (rank 0 prints each once)."""
    import ray

    return list(ray.get(run_actor(name).names.remote(start)))
