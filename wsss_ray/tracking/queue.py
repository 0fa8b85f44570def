"""The on-disk outage queue of :mod:`wsss_ray.tracking`: where a :class:`~wsss_ray.tracking.Tracker`
puts the MLflow calls it could not make while the server was unreachable, and how they are sent
later (:func:`flush_queue`, also behind ``python -m wsss_ray.tracking --flush DIR``).

Why a queue on disk: a multi-day run must not die (or stall for MLflow's minutes of retries)
because the tracking server restarted. One JSON-lines file per process, capped at
:data:`QUEUE_MAX_BYTES` (the oldest metric records go first), survives the process, so a resume
or the ``--flush`` command can send what a run left behind. The helpers that tell an outage
from a bad request (:func:`unreachable`) and make MLflow's HTTP client fail fast
(:func:`short_http`) live here too: the queue and the tracker both use them.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

#: the queue folder's name, in the run's storage folder (see :func:`run_queue_dir`)
QUEUE_DIR_NAME = "mlflow_queue"
#: the queue's cap on disk: past it the oldest metric records are dropped (and counted)
QUEUE_MAX_BYTES = 64 * 2**20
#: per failed request: one attempt, this many seconds of connect / read timeout
HTTP_TIMEOUT_S = 5
#: artifacts get longer to answer (the server writes the file before it replies)
ARTIFACT_TIMEOUT_S = 60


def run_queue_dir(run_storage: str, run_output: str) -> str:
    """Where a run queues its MLflow records while the server is unreachable:
    ``<run storage>/mlflow_queue`` when the storage is a local (or shared) folder, which the
    driver and the rank-0 worker see on any node; else (cloud storage)
    ``<output_dir>/<run name>/mlflow_queue``. Created only when something is queued."""
    base = run_output if "://" in run_storage else run_storage
    return os.path.join(os.path.abspath(base), QUEUE_DIR_NAME)


def _say(msg: str) -> None:
    """One line on the real stdout (Ray Train patches ``print`` in workers and doubles it)."""
    print(msg, file=sys.__stdout__, flush=True)


def unreachable(err: BaseException) -> bool:
    """True for a failure of the server or the network (refused or reset connection, timeout,
    a 5xx or 429 answer), which a later retry can fix; False for anything else, e.g. a 4xx
    answer to a bad request of ours, or a local sqlite store's error."""
    import requests
    from mlflow.exceptions import RestException

    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(
            e,
            requests.exceptions.ConnectionError
            | requests.exceptions.Timeout
            | requests.exceptions.RetryError  # 5xx / 429 answers past the retries
            | ConnectionError
            | TimeoutError,
        ):
            return True
        if isinstance(e, RestException):  # the server's answer: its status decides
            return e.get_http_status_code() >= 500
        e = e.__cause__ or e.__context__
    return False


_SET_HERE: set[str] = set()  # the variables short_http set (not the user's)


def _root_cause(err: BaseException) -> str:
    """The innermost exception of ``err``'s chain in one short line (e.g. ``Connection
    refused``), not MLflow's wrapper with the whole URL."""
    seen: set[int] = set()
    while id(err) not in seen and (err.__cause__ or err.__context__) is not None:
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return f"{type(err).__name__}: {err}".splitlines()[0][:160]


@contextlib.contextmanager
def short_http(timeout_s: int = HTTP_TIMEOUT_S) -> Iterator[None]:
    """Inside the block MLflow's HTTP client tries once with a ``timeout_s`` timeout instead of
    its default 7 retries with exponential backoff (minutes on a dead server). MLflow reads
    ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` / ``MLFLOW_HTTP_REQUEST_TIMEOUT`` at each request, so
    they are set for the block only (blocks nest); a value the user set wins."""
    saved: dict[str, str | None] = {}
    for key, value in (
        ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0"),
        ("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(timeout_s))),
    ):
        if key in os.environ and key not in _SET_HERE:
            continue
        saved[key] = os.environ.get(key)
        os.environ[key] = value
        _SET_HERE.add(key)
    try:
        yield
    finally:
        for key, prev in saved.items():
            if prev is None:
                os.environ.pop(key, None)
                _SET_HERE.discard(key)
            else:
                os.environ[key] = prev


class _QueueFile:
    """One process's queue: JSON lines, one record (a call we could not make) a line, appended;
    rewritten when records are sent or dropped. The folder is created with the first record."""

    def __init__(self, path: str, max_bytes: int = QUEUE_MAX_BYTES):
        self.path, self.max_bytes = path, max_bytes
        self.size = os.path.getsize(path) if os.path.exists(path) else 0
        self.dropped = 0  # metric records dropped over the cap

    def read(self) -> list[dict]:
        """The records; a line cut short (the process died writing it) is skipped."""
        records = []
        try:
            with open(self.path) as f:
                for line in f:
                    with contextlib.suppress(ValueError):
                        records.append(json.loads(line))
        except FileNotFoundError:
            pass
        return records

    def rewrite(self, records: list[dict]) -> None:
        if not records:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(self.path))  # the last file: leave no trace
            self.size = 0
            return
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        os.replace(tmp, self.path)
        self.size = os.path.getsize(self.path)

    def append(self, record: dict) -> int:
        """Append one record; over the cap, first drop the oldest metric records down to 90%
        of it. Returns how many were dropped (0 nearly always)."""
        line = json.dumps(record) + "\n"
        dropped = 0
        if self.size + len(line) > self.max_bytes:
            records = self.read()
            sizes = [len(json.dumps(r)) + 1 for r in records]
            total, target, keep = sum(sizes), 0.9 * self.max_bytes - len(line), []
            for r, n in zip(records, sizes):
                if total > target and r["op"] == "metrics":
                    total -= n
                    dropped += 1
                else:
                    keep.append(r)
            if total > target and record["op"] == "metrics":  # only non-metric records left
                self.rewrite(keep)
                self.dropped += dropped + 1
                return dropped + 1
            self.rewrite(keep)
            self.dropped += dropped
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(line)
        self.size += len(line)
        return dropped


def _send(client: Any, rec: dict) -> None:
    """Make the call one queue record stands for."""
    op, run_id = rec["op"], rec["run_id"]
    if op == "metrics":
        from mlflow.entities import Metric

        items = [Metric(k, float(v), rec["ts"], rec["step"]) for k, v in rec["metrics"].items()]
        for i in range(0, len(items), 1000):  # log_batch's limit
            client.log_batch(run_id, metrics=items[i : i + 1000])
    elif op == "tag":
        client.set_tag(run_id, rec["key"], rec["value"])
    elif op == "artifact":
        with short_http(ARTIFACT_TIMEOUT_S):
            if os.path.isdir(rec["path"]):
                client.log_artifacts(run_id, rec["path"], rec.get("artifact_path"))
            else:
                client.log_artifact(run_id, rec["path"], rec.get("artifact_path"))
    elif op == "terminate":
        client.set_terminated(run_id, status=rec["status"], end_time=rec["end_time"])
    else:
        raise ValueError(f"unknown queue record {op!r}")


def _batches(records: list[dict]) -> Iterator[list[dict]]:
    """The records in order, consecutive metric records of one run grouped (up to 1000
    metrics) so that a long outage is sent in few requests."""
    group: list[dict] = []
    count = 0
    for rec in records:
        n = len(rec.get("metrics", ()))
        if group and (
            rec["op"] != "metrics"
            or rec["run_id"] != group[0]["run_id"]
            or group[0]["op"] != "metrics"
            or count + n > 1000
        ):
            yield group
            group, count = [], 0
        group.append(rec)
        count += n
    if group:
        yield group


def _send_records(client: Any, records: list[dict]) -> tuple[int, int, list[dict]]:
    """Send ``records`` in order: (sent, rejected, left). Stops at the first unreachable error
    (that record and the rest are left); a record the server rejects (a 4xx) is dropped with
    one line, so that one bad record never blocks the queue."""
    from mlflow.entities import Metric

    sent = rejected = 0
    done = 0
    for group in _batches(records):
        try:
            with short_http():
                if len(group) > 1:  # metric records of one run: one log_batch
                    items = [
                        Metric(k, float(v), r["ts"], r["step"])
                        for r in group
                        for k, v in r["metrics"].items()
                    ]
                    client.log_batch(group[0]["run_id"], metrics=items)
                else:
                    _send(client, group[0])
            sent += len(group)
        except Exception as err:  # noqa: BLE001 - sorted below
            if unreachable(err):
                return sent, rejected, records[done:]
            rejected += len(group)
            _say(f"[wsss_ray] MLflow rejected {len(group)} queued record(s), dropped: {err}")
        done += len(group)
    return sent, rejected, []


def queue_files(queue_dir: str) -> list[str]:
    """The queue files in ``queue_dir``, oldest first."""
    try:
        names = [n for n in os.listdir(queue_dir) if n.endswith(".jsonl")]
    except FileNotFoundError:
        return []

    def mtime(path: str) -> float:
        try:
            return os.path.getmtime(path)
        except FileNotFoundError:  # sent meanwhile
            return 0.0

    return sorted((os.path.join(queue_dir, n) for n in names), key=mtime)


@dataclass
class FlushResult:
    sent: int = 0
    rejected: int = 0
    left: int = 0


def flush_queue(queue_dir: str, uri: str | None = None) -> FlushResult:
    """Send every record queued in ``queue_dir`` (all its processes' files, oldest first) to
    ``uri`` (default: the URI each record was queued for), in order; a server that does not
    answer keeps the rest of its records queued. Files emptied are removed, and the folder
    with the last one."""
    from mlflow.tracking import MlflowClient

    result = FlushResult()
    clients: dict[str, Any] = {}
    down: set[str] = set()  # servers that did not answer: the rest of their records stay
    for path in queue_files(queue_dir):
        qf = _QueueFile(path)
        by_uri: dict[str, list[dict]] = {}
        for rec in qf.read():
            by_uri.setdefault(uri or rec["uri"], []).append(rec)
        left: list[dict] = []
        for target, recs in by_uri.items():
            if target in down:
                left.extend(recs)
                continue
            client = clients.setdefault(target, MlflowClient(tracking_uri=target))
            sent, rejected, rest = _send_records(client, recs)
            result.sent += sent
            result.rejected += rejected
            if rest:
                down.add(target)
                left.extend(rest)
        if sum(len(r) for r in by_uri.values()) != len(left):  # untouched: keep its mtime
            qf.rewrite(left)
        result.left += len(left)
    with contextlib.suppress(OSError):
        os.rmdir(queue_dir)  # only when empty
    return result


def _send_leftovers(queue_dir: str) -> None:
    """Send what an earlier process of this run left queued (to the URI it was queued for);
    what cannot be sent stays queued, for ``finish`` or the next try."""
    result = flush_queue(queue_dir)
    if result.sent or result.rejected:
        _say(
            f"[wsss_ray] MLflow: {result.sent} records an earlier process left in {queue_dir}"
            f" sent ({result.rejected} rejected, {result.left} still queued)"
        )
