"""MLflow tracking: the driver opens (or reopens, on resume) one run per Ray Train run name and
logs the resolved config; rank 0 logs metrics, throughput, skipped samples and checkpoint paths.

Default tracking URI: ``sqlite:///<output_dir>/mlflow.db`` (MLflow 3 refuses plain file stores),
artifacts in ``<output_dir>/mlartifacts``;
``MLFLOW_TRACKING_URI`` (or ``tracking.uri``) points at a server for clusters. We use
``MlflowClient`` with explicit run ids so workers never depend on a global active run.

A multi-day run must not die because the tracking server restarted (MLflow's client raises
once its retries, minutes of them, run out): with a queue folder, a :class:`Tracker` call that
finds the server unreachable queues the record on disk (bounded) and training goes on; the
queue is sent when the server answers again, at ``finish``, on a resume, or by
``python -m wsss_ray.tracking --flush DIR``. See docs/TRAINING.md, "Tracking outages".
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUN_NAME_TAG = "wsss_ray.run_name"
STORAGE_TAG = "wsss_ray.storage"


def local_artifact_location(uri: str, output_dir: str) -> str | None:
    """With a local sqlite store MLflow would put artifacts in ``./mlruns`` of whatever the
    working directory is; keep them beside the database instead."""
    if uri.startswith("sqlite:"):
        return (Path(output_dir).resolve() / "mlartifacts").as_uri()
    return None


def tracking_uri(cfg_uri: str, output_dir: str) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI", "")
    if env:
        return env
    if cfg_uri:
        return cfg_uri
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


@contextlib.contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API (``mlflow.start_run``, ``log_model``, ``models:/`` URIs) pointed at
    ``uri`` inside the block only. ``mlflow.set_tracking_uri`` also sets the
    ``MLFLOW_TRACKING_URI`` environment variable, which :func:`tracking_uri` reads first: left
    behind, it would send every later run of the process to this store."""
    import mlflow

    prev_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        if prev_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = prev_env
        try:  # back to "not set" (the env var, then the default), not to a pinned value
            import mlflow.tracking._tracking_service.utils as tracking_utils

            tracking_utils._tracking_uri = None
        except (ImportError, AttributeError):  # pragma: no cover - another MLflow layout
            mlflow.set_tracking_uri(prev_env or "")


#: the queue folder's name, in the run's storage folder (see :func:`run_queue_dir`)
QUEUE_DIR_NAME = "mlflow_queue"
#: the queue's cap on disk: past it the oldest metric records are dropped (and counted)
QUEUE_MAX_BYTES = 64 * 2**20
#: while records are queued, a call tries to send them at most this often; the wait doubles
#: with each failed try up to FLUSH_MAX_EVERY_S (a black-holed server costs HTTP_TIMEOUT_S a try)
FLUSH_EVERY_S = 30.0
FLUSH_MAX_EVERY_S = 300.0
#: per failed request: one attempt, this many seconds of connect / read timeout
HTTP_TIMEOUT_S = 5
#: artifacts get longer to answer (the server writes the file before it replies)
ARTIFACT_TIMEOUT_S = 60
#: opening the run waits this long for an unreachable server (env ``WSSS_RAY_MLFLOW_WAIT_S``)
OPEN_WAIT_S = 60.0


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


class Tracker:
    """Thin wrapper over MlflowClient bound to one run. A disabled tracker does nothing.

    With a ``queue_dir`` an unreachable server (see :func:`unreachable`) never fails a call:
    the record goes to a bounded JSON-lines file there, with one warning line; each later call
    first tries to send the queue (at most every ``flush_every_s``, doubling while it fails, up
    to ``FLUSH_MAX_EVERY_S``: while the server is down a call is one local append), keeping
    steps and timestamps, with one line when it is sent.
    Artifacts are queued as their local path (the file stays where it is). ``finish`` tries a
    last time and, if the server is still down, says how to send the queue later
    (``python -m wsss_ray.tracking --flush DIR``; opening the run again, a resume, sends it
    too)."""

    def __init__(
        self,
        uri: str,
        run_id: str | None,
        queue_dir: str | None = None,
        max_queue_bytes: int = QUEUE_MAX_BYTES,
        flush_every_s: float = FLUSH_EVERY_S,
    ):
        self.uri, self.run_id, self.queue_dir = uri, run_id, queue_dir
        self.flush_every_s = flush_every_s
        self._client = None
        self._queue: _QueueFile | None = None
        self._last_try = 0.0
        self._fails = 0  # failed tries to send the queue in a row
        self._offline_since: float | None = None
        self._sent = 0  # records sent from the queue in this outage
        if run_id:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=uri)
            if queue_dir:
                name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
                self._queue = _QueueFile(os.path.join(queue_dir, name), max_queue_bytes)

    @classmethod
    def open_run(
        cls,
        uri: str,
        experiment: str,
        run_name: str,
        storage: str,
        params: dict[str, Any],
        config_file: str | None,
        artifact_location: str | None = None,
        resume: bool = True,
        queue_dir: str | None = None,
        wait_s: float | None = None,
    ) -> Tracker:
        """Reuse the run of the same name and storage (a resume), else create it; with
        ``resume=False`` (evaluations) always create a new run. ``artifact_location`` applies
        when the experiment is created (a tracking server chooses its own when it is None).

        The run id comes from the server, so opening needs it: an unreachable server is waited
        for ``wait_s`` (default ``OPEN_WAIT_S``, env ``WSSS_RAY_MLFLOW_WAIT_S``; a server that
        restarts with the cluster is back by then), then ``ConfigError`` naming the URI. Records
        an earlier process left queued in ``queue_dir`` (a run stopped while the server was
        down) are sent first, their run's end included, before it is marked RUNNING again."""
        from wsss_ray.config import ConfigError

        if wait_s is None:
            wait_s = float(os.environ.get("WSSS_RAY_MLFLOW_WAIT_S", OPEN_WAIT_S))
        deadline, warned = time.monotonic() + wait_s, False
        while True:
            try:
                if queue_dir and queue_files(queue_dir):  # before the run is RUNNING again
                    _send_leftovers(queue_dir)
                with short_http():
                    run_id = _open_run(
                        uri,
                        experiment,
                        run_name,
                        storage,
                        params,
                        config_file,
                        artifact_location,
                        resume,
                    )
                break
            except Exception as err:
                if not unreachable(err):
                    raise
                left = deadline - time.monotonic()
                if left <= 0:
                    reason = _root_cause(err)
                    raise ConfigError(
                        f"tracking.uri: MLflow at {uri} is unreachable (waited {wait_s:.0f} s;"
                        f" {reason}): start the server, point tracking.uri / MLFLOW_TRACKING_URI"
                        " at a running one, or set tracking.enabled=false"
                    ) from None
                if not warned:
                    _say(f"[wsss_ray] MLflow at {uri} unreachable: waiting up to {wait_s:.0f} s")
                    warned = True
                time.sleep(min(5.0, left))
        return cls(uri, run_id, queue_dir)

    @property
    def queued(self) -> int:
        """Records of this tracker waiting in its queue file."""
        return len(self._queue.read()) if self._queue else 0

    def _flush(self, force: bool = False, everything: bool = False) -> bool:
        """Try to send the queue (this process's file; ``everything``: every file of the
        folder). Rate-limited unless ``force``. True when nothing of ours is left queued."""
        assert self._queue is not None and self.queue_dir is not None
        wait = min(self.flush_every_s * 2**self._fails, max(FLUSH_MAX_EVERY_S, self.flush_every_s))
        if not force and time.monotonic() - self._last_try < wait:
            return self._queue.size == 0
        self._last_try = time.monotonic()
        if everything:
            result = flush_queue(self.queue_dir)
            own = self._queue.path
            self._queue.size = os.path.getsize(own) if os.path.exists(own) else 0
        else:
            records = self._queue.read()
            sent, rejected, left = _send_records(self._client, records)
            self._queue.rewrite(left)
            result = FlushResult(sent, rejected, len(left))
        self._sent += result.sent
        self._fails = min(self._fails + 1, 16) if result.left else 0
        if result.left == 0 and (self._offline_since is not None or result.sent):
            extra = f", {self._queue.dropped} dropped over the queue's cap" * bool(
                self._queue.dropped
            ) + f", {result.rejected} rejected" * bool(result.rejected)
            _say(f"[wsss_ray] MLflow at {self.uri} back: {self._sent} queued records sent{extra}")
            self._offline_since, self._sent = None, 0
        return self._queue.size == 0

    def _record(self, rec: dict) -> None:
        """Make the call ``rec`` stands for, or queue it (see the class docstring)."""
        rec = {"run_id": self.run_id, "uri": self.uri, **rec}
        if self._queue is None:
            _send(self._client, rec)
            return
        if self._queue.size and not self._flush():
            self._enqueue(rec)
            return
        try:
            with short_http():
                _send(self._client, rec)
        except Exception as err:
            if not unreachable(err):
                raise
            if self._offline_since is None:
                self._offline_since = time.monotonic()
                self._last_try = time.monotonic()
                _say(
                    f"[wsss_ray] MLflow at {self.uri} unreachable: queueing metrics on disk in"
                    f" {self.queue_dir}; training goes on"
                )
            self._enqueue(rec)

    def _enqueue(self, rec: dict) -> None:
        assert self._queue is not None
        before = self._queue.dropped
        if self._queue.append(rec) and before == 0:
            _say(
                f"[wsss_ray] MLflow queue {self.queue_dir} reached its cap "
                f"({self._queue.max_bytes / 2**20:.0f} MiB): dropping the oldest metric records"
                " (counted; the count is printed when the queue is sent)"
            )

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self._client is None:
            return
        ts = int(time.time() * 1000)
        values = {k: float(v) for k, v in metrics.items()}
        self._record({"op": "metrics", "metrics": values, "ts": ts, "step": int(step)})

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        """A file, or a folder's files (under ``artifact_path``)."""
        if self._client is None:
            return
        self._record(
            {"op": "artifact", "path": os.path.abspath(path), "artifact_path": artifact_path}
        )

    def set_tag(self, key: str, value: str) -> None:
        if self._client is not None:
            self._record({"op": "tag", "key": key, "value": str(value)})

    def online(self) -> bool:
        """False while records stay queued after one more try (the server is unreachable)."""
        return self._queue is None or self._queue.size == 0 or self._flush(force=True)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run. With a queue: send what every process of the run queued, then the end;
        if the server is still down the queue stays on disk and one line says how to send it."""
        if self._client is None:
            return
        end = {"op": "terminate", "status": status, "end_time": int(time.time() * 1000)}
        if self._queue is None:
            self._record(end)
            return
        if queue_files(self.queue_dir) and not self._flush(force=True, everything=True):
            self._enqueue({"run_id": self.run_id, "uri": self.uri, **end})  # still down
        else:
            self._record(end)
        if self._queue.size:
            left = sum(len(_QueueFile(p).read()) for p in queue_files(self.queue_dir))
            _say(
                f"[wsss_ray] MLflow at {self.uri} still unreachable: {left} records stay queued"
                f" in {self.queue_dir}; send them with `python -m wsss_ray.tracking --flush"
                f" {self.queue_dir}` once it is back (a resume of this run sends them too)"
            )


def _open_run(
    uri: str,
    experiment: str,
    run_name: str,
    storage: str,
    params: dict[str, Any],
    config_file: str | None,
    artifact_location: str | None,
    resume: bool,
) -> str:
    """:meth:`Tracker.open_run`'s calls; returns the run id."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = (
        exp.experiment_id
        if exp
        else client.create_experiment(experiment, artifact_location=artifact_location)
    )
    found = resume and client.search_runs(
        [exp_id],
        filter_string=(
            f"tags.`{RUN_NAME_TAG}` = '{run_name}' and tags.`{STORAGE_TAG}` = '{storage}'"
        ),
        max_results=1,
    )
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        run = client.create_run(
            exp_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, STORAGE_TAG: storage}
        )
        run_id = run.info.run_id
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            client.log_batch(run_id, params=items[i : i + 100])
    if config_file:
        with short_http(ARTIFACT_TIMEOUT_S):
            client.log_artifact(run_id, config_file)
    return run_id


def log_job_run(
    cfg: Any,
    output_dir: str,
    folder: str,
    name: str,
    config_file: str,
    metrics: dict[str, float],
    artifacts: list[str] | tuple[str, ...] = (),
    folders: dict[str, str] | None = None,
    series: list[dict[str, float]] | None = None,
) -> str:
    """One new MLflow run for a job that is not a training run (evaluation, prototypes,
    pseudo-labels): the config as params and artifact, ``metrics`` at step 0, ``series[i]`` at
    step i, ``artifacts`` (files) and ``folders`` (folder -> artifact path). Prints
    where it went and returns the run id. A server unreachable at the start (past
    :data:`OPEN_WAIT_S`) is one line and "" (the job's files hold its results); one that goes
    away later queues in ``<folder>/mlflow_queue``."""
    uri = tracking_uri(cfg.tracking.uri, output_dir)
    from wsss_ray.config import ConfigError, to_flat_dict

    try:
        tracker = Tracker.open_run(
            uri,
            cfg.tracking.experiment,
            name,
            folder,
            to_flat_dict(cfg),
            config_file,
            local_artifact_location(uri, output_dir),
            resume=False,
            queue_dir=os.path.join(folder, QUEUE_DIR_NAME),
        )
    except ConfigError as err:
        _say(f"[wsss_ray] not logged to MLflow: {err}")
        return ""
    for i, values in enumerate(series or []):
        tracker.log_metrics(values, i)
    tracker.log_metrics(metrics, 0)
    for path in artifacts:
        tracker.log_artifact(path)
    for path, artifact_path in (folders or {}).items():
        tracker.log_artifact(path, artifact_path)
    tracker.finish()
    print(f"[wsss_ray] MLflow: {uri} (run {tracker.run_id})", flush=True)
    return tracker.run_id


def main(argv: list[str] | None = None) -> int:
    """``python -m wsss_ray.tracking --flush DIR [--uri URI]``: send a run's queued MLflow
    records (left by a run that ended while the server was down). Exit 0 when all were sent,
    1 when the server is still unreachable, 2 when DIR holds no queue."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m wsss_ray.tracking", description=main.__doc__)
    parser.add_argument("--flush", required=True, metavar="DIR", help="a run's mlflow_queue folder")
    parser.add_argument("--uri", default=None, help="send there instead of the queued URI")
    args = parser.parse_args(argv)
    if not queue_files(args.flush):
        print(f"--flush: no queued MLflow records in {args.flush}", file=sys.stderr)
        return 2
    result = flush_queue(args.flush, args.uri)
    print(
        f"[wsss_ray] MLflow: {result.sent} queued records sent, {result.rejected} rejected,"
        f" {result.left} left" + (" (server unreachable)" if result.left else ""),
        flush=True,
    )
    return 1 if result.left else 0


if __name__ == "__main__":
    sys.exit(main())
