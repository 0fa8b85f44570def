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

Layout: this module holds the URIs, :class:`Tracker` and :func:`log_job_run`; the on-disk
outage queue and MLflow's short-timeout HTTP are in :mod:`wsss_ray.tracking.queue` (re-exported
here), the ``--flush`` command in :mod:`wsss_ray.tracking.__main__` (``main`` is loaded from it on
first use, so that ``python -m wsss_ray.tracking`` does not import that module twice).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wsss_ray.tracking.queue import (
    ARTIFACT_TIMEOUT_S,
    HTTP_TIMEOUT_S,
    QUEUE_DIR_NAME,
    QUEUE_MAX_BYTES,
    FlushResult,
    _QueueFile,
    _root_cause,
    _say,
    _send,
    _send_leftovers,
    _send_records,
    flush_queue,
    queue_files,
    run_queue_dir,
    short_http,
    unreachable,
)

__all__ = [
    "ARTIFACT_TIMEOUT_S",
    "FLUSH_EVERY_S",
    "FLUSH_MAX_EVERY_S",
    "HTTP_TIMEOUT_S",
    "OPEN_WAIT_S",
    "QUEUE_DIR_NAME",
    "QUEUE_MAX_BYTES",
    "RUN_NAME_TAG",
    "STORAGE_TAG",
    "FlushResult",
    "Tracker",
    "check_server",
    "flush_queue",
    "local_artifact_location",
    "log_job_run",
    "main",
    "queue_files",
    "run_queue_dir",
    "short_http",
    "tracking_uri",
    "unreachable",
    "using_tracking_uri",
]

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


#: while records are queued, a call tries to send them at most this often; the wait doubles
#: with each failed try up to FLUSH_MAX_EVERY_S (a black-holed server costs HTTP_TIMEOUT_S a try)
FLUSH_EVERY_S = 30.0
FLUSH_MAX_EVERY_S = 300.0
#: opening the run waits this long for an unreachable server (env ``WSSS_RAY_MLFLOW_WAIT_S``)
OPEN_WAIT_S = 60.0


def _waiting_for_server(uri: str, wait_s: float | None, call: Any) -> Any:
    """``call()``, tried again every 5 s while the server at ``uri`` is unreachable, for
    ``wait_s`` (default ``OPEN_WAIT_S``, env ``WSSS_RAY_MLFLOW_WAIT_S``), then ``ConfigError``
    naming the URI; one line when the waiting starts."""
    from wsss_ray.config import ConfigError

    if wait_s is None:
        wait_s = float(os.environ.get("WSSS_RAY_MLFLOW_WAIT_S", OPEN_WAIT_S))
    deadline, warned = time.monotonic() + wait_s, False
    while True:
        try:
            return call()
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


def check_server(uri: str, wait_s: float | None = None) -> None:
    """Before a job starts Ray: a tracking server (``http(s)://``) that does not answer is
    waited for as :meth:`Tracker.open_run` waits, then ``ConfigError``; so a dead server ends
    the job after the wait alone, not after Ray's start-up too. Local stores pass at once, and
    so does a server that answers with an error (opening the run reports that)."""
    if not uri.startswith(("http://", "https://")):
        return
    from mlflow.tracking import MlflowClient

    def probe() -> None:
        with short_http():
            try:
                MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
            except Exception as err:
                if unreachable(err):
                    raise

    _waiting_for_server(uri, wait_s, probe)


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

        def attempt() -> str:
            """Send what an earlier process left queued (before the run is RUNNING again),
            then find or create the run; returns its id."""
            if queue_dir and queue_files(queue_dir):
                _send_leftovers(queue_dir)
            with short_http():
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
                        f"tags.`{RUN_NAME_TAG}` = '{run_name}'"
                        f" and tags.`{STORAGE_TAG}` = '{storage}'"
                    ),
                    max_results=1,
                )
                if found:
                    run_id = found[0].info.run_id
                    client.update_run(run_id, status="RUNNING")
                else:
                    run = client.create_run(
                        exp_id,
                        run_name=run_name,
                        tags={RUN_NAME_TAG: run_name, STORAGE_TAG: storage},
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

        run_id = _waiting_for_server(uri, wait_s, attempt)
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


def __getattr__(name: str) -> Any:
    """``main`` (the ``--flush`` command) comes from :mod:`wsss_ray.tracking.__main__` on first
    use: imported here eagerly, ``python -m wsss_ray.tracking`` would find that module already
    loaded and warn that it runs twice."""
    if name == "main":
        from wsss_ray.tracking.__main__ import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
