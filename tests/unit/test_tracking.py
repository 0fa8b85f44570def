"""The MLflow tracker's outage queue (issue 24): a tracker pointed at a server that does not
answer returns at once, queues its records on disk (bounded, the dropped ones counted) with one
warning line, and sends them, steps and timestamps kept, when the server answers again. The
"server that answers again" is a local sqlite store (no server process here); the kill and
restart of a real ``mlflow server`` is tests/integration/test_tracking_outage.py."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from wsss_ray.tracking import Tracker, flush_queue, main, queue_files, unreachable


def _dead_uri() -> str:
    """An http URI where nothing listens (a port the OS just handed out, closed again)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite MLflow store and a client on it (created once: ~2 s of migrations)."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("t", artifact_location=(root / "art").as_uri())
    return uri, client, exp


def _lines(capfd, text: str) -> list[str]:
    return [ln for ln in capfd.readouterr().out.splitlines() if text in ln]


def test_dead_server_queues_on_disk_fast_then_flush_sends_every_step(tmp_path, store, capfd):
    uri, client, exp = store
    run_id = client.create_run(exp).info.run_id
    queue = tmp_path / "mlflow_queue"
    dead = _dead_uri()
    tracker = Tracker(dead, run_id, queue_dir=str(queue))
    artifact = tmp_path / "config.yaml"
    artifact.write_text("a: 1\n")

    t0 = time.perf_counter()
    for step in range(10, 60, 10):
        tracker.log_metrics({"loss": step / 10, "lr": 1e-3}, step)
    tracker.set_tag("checkpoint/latest", "/runs/x/checkpoint_step_00000050")
    tracker.log_artifact(str(artifact))
    took = time.perf_counter() - t0
    assert took < 3.0, took  # no retries with backoff: one refused connection, then appends
    warn = _lines(capfd, "unreachable")
    assert warn == [
        f"[wsss_ray] MLflow at {dead} unreachable: queueing metrics on disk in {queue};"
        " training goes on"
    ]
    (path,) = queue_files(str(queue))
    records = [json.loads(ln) for ln in open(path)]
    assert [r["op"] for r in records] == ["metrics"] * 5 + ["tag", "artifact"]
    assert [r["step"] for r in records[:5]] == [10, 20, 30, 40, 50]
    stamps = [r["ts"] for r in records[:5]]

    tracker.finish("FINISHED")  # still down: the end is queued too, and we are told how to send
    (left,) = _lines(capfd, "still unreachable")
    assert f"8 records stay queued in {queue}" in left
    assert f"python -m wsss_ray.tracking --flush {queue}" in left
    assert tracker.queued == 8

    assert main(["--flush", str(queue)]) == 1  # to the queued URI: still down
    assert (
        "0 queued records sent, 0 rejected, 8 left (server unreachable)" in capfd.readouterr().out
    )
    assert main(["--flush", str(queue), "--uri", uri]) == 0  # the server is back
    assert "8 queued records sent, 0 rejected, 0 left" in capfd.readouterr().out
    assert not queue.exists()  # sent: nothing left behind
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value, m.timestamp) for m in history] == [
        (s, s / 10, ts) for s, ts in zip([10, 20, 30, 40, 50], stamps)
    ]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["checkpoint/latest"].endswith("checkpoint_step_00000050")
    assert [a.path for a in client.list_artifacts(run_id)] == ["config.yaml"]


def test_next_call_sends_the_queue_when_the_server_answers_rate_limited(tmp_path, store, capfd):
    uri, client, exp = store
    from mlflow.tracking import MlflowClient

    run_id = client.create_run(exp).info.run_id
    tracker = Tracker(_dead_uri(), run_id, queue_dir=str(tmp_path / "q"), flush_every_s=3600)
    tracker.log_metrics({"loss": 1.0}, 1)
    assert not tracker.online() and tracker._fails == 1  # one more try: the wait doubles
    tracker._client = MlflowClient(tracking_uri=uri)  # the server is back
    tracker.log_metrics({"loss": 2.0}, 2)  # within flush_every_s: queued, no request
    assert tracker.queued == 2 and client.get_metric_history(run_id, "loss") == []
    tracker.flush_every_s = 0
    tracker.log_metrics({"loss": 3.0}, 3)  # sends the queue first, then itself
    assert tracker.queued == 0 and tracker._fails == 0
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3]
    assert _lines(capfd, " back: ") == [
        f"[wsss_ray] MLflow at {tracker.uri} back: 2 queued records sent"
    ]


def test_resume_sends_what_a_stopped_run_left_queued_before_it_runs_again(tmp_path, store, capfd):
    uri, client, _ = store
    queue = tmp_path / "mlflow_queue"
    args = ("t", "resumed", str(tmp_path), {"a": 1}, None)
    run_id = Tracker.open_run(uri, *args, queue_dir=str(queue)).run_id
    dead = _dead_uri()  # the same server, gone
    first = Tracker(dead, run_id, queue_dir=str(queue))
    first.log_metrics({"loss": 1.0}, 10)
    first.finish("KILLED")  # Ctrl-C while it is down: the metrics and the end stay queued
    (path,) = queue_files(str(queue))
    assert first.queued == 2
    text = open(path).read()
    with open(path, "w") as f:  # ... and back (each record names the URI it is for)
        f.write(text.replace(dead, uri) + '{"op": "metrics", "run_')  # + a line cut short
    again = Tracker.open_run(uri, *args, queue_dir=str(queue))
    assert again.run_id == run_id
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [10]
    assert client.get_run(run_id).info.status == "RUNNING"  # the old end came first
    assert not queue.exists()
    assert f"2 records an earlier process left in {queue} sent" in capfd.readouterr().out


def test_queue_is_bounded_dropping_the_oldest_metric_records_counted(tmp_path, capfd):
    queue = tmp_path / "q"
    tracker = Tracker(_dead_uri(), "r1", queue_dir=str(queue), max_queue_bytes=4000)
    tracker.set_tag("checkpoint/latest", "c0")  # never dropped
    for step in range(200):
        tracker.log_metrics({"loss": 1.0, "lr": 0.5}, step)
    (path,) = queue_files(str(queue))
    records = [json.loads(ln) for ln in open(path)]
    size = sum(len(ln) for ln in open(path))
    assert size <= 4000
    assert records[0]["op"] == "tag"
    steps = [r["step"] for r in records[1:]]
    assert steps == list(range(200 - len(steps), 200))  # the newest, in order
    assert tracker._queue.dropped == 200 - len(steps) > 100
    assert len(_lines(capfd, "reached its cap (0 MiB)")) == 1  # said once


class _Answer(BaseHTTPRequestHandler):
    """Every request gets ``status`` and an MLflow error body."""

    status = 503

    def do_POST(self):  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.dumps({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad"}).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status, queued", [(503, True), (500, True), (400, False)])
def test_server_errors_queue_but_our_bad_requests_raise(tmp_path, status, queued):
    handler = type("H", (_Answer,), {"status": status})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        tracker = Tracker(uri, "r1", queue_dir=str(tmp_path / "q"))
        t0 = time.perf_counter()
        if queued:
            tracker.log_metrics({"loss": 1.0}, 1)
            assert tracker.queued == 1
        else:
            from mlflow.exceptions import RestException

            with pytest.raises(RestException, match="bad") as err:
                tracker.log_metrics({"loss": 1.0}, 1)
            assert not unreachable(err.value) and tracker.queued == 0
        assert time.perf_counter() - t0 < 3.0  # no backoff on 5xx either
    finally:
        server.shutdown()
        server.server_close()


def test_open_run_on_a_dead_server_is_one_config_error_naming_the_uri(tmp_path):
    from wsss_ray.config import ConfigError

    dead = _dead_uri()
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=f"tracking.uri: MLflow at {dead} is unreachable"):
        Tracker.open_run(dead, "e", "r", str(tmp_path), {}, None, wait_s=0)
    assert time.perf_counter() - t0 < 3.0


@pytest.mark.parametrize("status", [None, 503, 400])
def test_check_server_before_ray_starts(tmp_path, status):
    """The probe the training driver runs before Ray: dead or 5xx = the open-run error after
    the wait; a server that answers (here: 400 to everything) passes; local stores pass."""
    from wsss_ray.config import ConfigError
    from wsss_ray.tracking import check_server

    check_server(f"sqlite:///{tmp_path}/mlflow.db", wait_s=0)
    assert not (tmp_path / "mlflow.db").exists()  # a local store is not even opened
    server = None
    if status is None:
        uri = _dead_uri()
    else:
        handler = type("H", (_Answer,), {"status": status})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        uri = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        t0 = time.perf_counter()
        if status == 400:
            check_server(uri, wait_s=0)
        else:
            with pytest.raises(ConfigError, match=f"MLflow at {uri} is unreachable"):
                check_server(uri, wait_s=0)
        assert time.perf_counter() - t0 < 3.0
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()


def test_flush_cli_without_a_queue_is_exit_2(tmp_path, capsys):
    assert main(["--flush", str(tmp_path / "none")]) == 2
    assert "no queued MLflow records in" in capsys.readouterr().err
    assert flush_queue(str(tmp_path / "none")).sent == 0
