"""A training run survives its MLflow tracking server going away (issue 24): the tiny CLIP job
logs to a local ``mlflow server``; the server is killed after the job's first report and
restarted (same database) after its second, so at least one report finds no server. The job
finishes (exit 0, one warning line, the queue sent), the MLflow run is FINISHED and every
reported step's metrics are in MLflow: 0 lost."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests._jobs import ROOT, tiny_clip_job

pytestmark = pytest.mark.slow  # one training job and two server starts: ~3 min on 2 cores

STEPS = 40
STEP_LINE = re.compile(r"\[wsss_ray\] step (\d+)/")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(tmp: Path, port: int) -> subprocess.Popen:
    """``mlflow server`` on 127.0.0.1:port (sqlite backend and artifacts under ``tmp``), in its
    own process group (its uvicorn workers die with it); returns once it answers."""
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    log = open(tmp / "server.log", "a")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [
            mlflow_bin,
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp / 'mlflow.db'}",
            "--artifacts-destination",
            str(tmp / "mlartifacts"),
        ],
        cwd=tmp,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240  # seconds when idle; minutes on a loaded machine
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    _kill(proc)
    raise RuntimeError(f"mlflow server did not start: {(tmp / 'server.log').read_text()[-2000:]}")


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the server's process group (what a crashed or restarted host does)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def test_job_survives_tracking_server_restart_and_loses_no_metric_step(tmp_path):
    from mlflow.tracking import MlflowClient

    srv_dir = tmp_path / "server"
    srv_dir.mkdir()
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _start_server(srv_dir, port)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    job = subprocess.Popen(
        tiny_clip_job(tmp_path / "out", STEPS, f"tracking.uri={uri}", "tracking.log_model=false"),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    lines: list[str] = []
    killed_at = restarted_at = None
    try:
        deadline = time.monotonic() + 720
        for line in job.stdout:
            lines.append(line)
            m = STEP_LINE.search(line)
            if m and int(m.group(1)) == 10 and killed_at is None:
                _kill(server)  # the report of step 20 finds no server
                killed_at = time.monotonic()
            elif m and int(m.group(1)) == 20 and restarted_at is None:
                server = _start_server(srv_dir, port)
                restarted_at = time.monotonic()
            if time.monotonic() > deadline:
                break
        rc = job.wait(timeout=max(1, deadline - time.monotonic()))
    finally:
        if job.poll() is None:
            job.kill()
            job.wait(timeout=30)
    out = "".join(lines)
    try:
        assert rc == 0, out[-3000:]
        assert killed_at and restarted_at, out[-3000:]
        warnings = [ln for ln in lines if "unreachable: queueing metrics on disk" in ln]
        assert len(warnings) == 1, warnings  # one line, however many reports were queued
        assert re.search(r"MLflow at \S+ back: \d+ queued records sent", out), out[-3000:]
        assert not list((tmp_path / "out").rglob("mlflow_queue")), "queue left on disk"

        client = MlflowClient(tracking_uri=uri)
        (run,) = client.search_runs(
            [client.get_experiment_by_name("wsss_ray").experiment_id],
            filter_string="tags.`wsss_ray.run_name` = 'clip_tiny'",
        )
        assert run.info.status == "FINISHED"
        reported = sorted({int(m.group(1)) for m in STEP_LINE.finditer(out)})
        assert reported == list(range(10, STEPS + 1, 10)), reported
        for key in ("loss", "lr", "samples_per_s"):
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            assert steps == reported, (key, steps)  # 0 metric steps lost
        assert run.data.tags["checkpoint/latest"].endswith(f"checkpoint_step_{STEPS:08d}")
        said = [ln.strip() for ln in lines if "[wsss_ray] MLflow" in ln or "] step " in ln]
        print(
            f"\nserver down {restarted_at - killed_at:.0f} s; reports: {reported}", *said, sep="\n"
        )
    finally:
        _kill(server)
