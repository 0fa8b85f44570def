"""A two-node Ray cluster on one machine, driven the way a real cluster is: `ray start` a head
and a second node (each with its own resources), an MLflow tracking server on loopback started
by cluster/mlflow/server.sh, and `ray job submit --working-dir` of jobs/pretrain_pgseg.py.

Each node offers one unit of a custom `train_slot` resource and the job asks for one per train
worker (`scaling.resources_per_worker.train_slot=1`), so the two workers must land on different
nodes; the test then checks where the RayTrainWorker actors actually ran (Ray's state API), that
the job succeeded, and that the server holds the run's metrics. Both nodes share this machine's
disk, so the local `run.output_dir` stands in for the shared storage (S3/GCS/NFS) that
`run.storage_path` and the shards need on a real cluster.

Teardown kills only this cluster's processes (those started here and their descendants, and
anything whose command line names this test's temp dir): `ray stop` would kill every Ray on the
machine, other people's included.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STEPS = 6


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # `python` in the job is this venv's
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="token",  # Ray's token auth, with the token of ~/.ray/auth_token
        RAY_DATA_DISABLE_PROGRESS_BARS="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def _wait(what: str, check, timeout: float, proc: subprocess.Popen | None = None, log=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception:  # noqa: BLE001 - not up yet
            pass
        if proc is not None and proc.poll() is not None:
            tail = Path(log).read_text()[-3000:] if log else ""
            raise RuntimeError(f"{what}: process exited with {proc.returncode}\n{tail}")
        time.sleep(1.0)
    raise TimeoutError(f"{what}: not ready after {timeout:.0f}s")


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status == 200


def _ensure_auth_token() -> None:
    """Ray 2.60 authenticates clients with a token; `ray start` with RAY_AUTH_MODE=token uses
    ~/.ray/auth_token, which ray.init() also creates and reads. Make sure one exists."""
    subprocess.run(
        [str(BIN / "ray"), "get-auth-token", "--generate"],
        env=_env(), capture_output=True, check=True, timeout=120,
    )  # fmt: skip


class LocalCluster:
    """Processes this test owns; ``stop()`` kills them and only them."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = self.tmp / f"{name}.log"
        self.logs.append(log)
        proc = subprocess.Popen(
            cmd,
            stdout=open(log, "wb"),
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.tmp,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def _owned(self) -> list[psutil.Process]:
        found: dict[int, psutil.Process] = {}
        roots = []
        for p in self.procs:
            try:
                roots.append(psutil.Process(p.pid))
            except psutil.NoSuchProcess:
                pass
        marker = str(self.tmp)
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if any(marker in arg for arg in proc.info["cmdline"] or []):
                    roots.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        for root in roots:
            try:
                for proc in [root, *root.children(recursive=True)]:
                    found[proc.pid] = proc
            except psutil.NoSuchProcess:
                pass
        found.pop(os.getpid(), None)
        return list(found.values())

    def stop(self) -> None:
        owned = self._owned()
        for p in self.procs:  # `ray start --block` tears its node down on SIGTERM
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(owned, timeout=15)
        for proc in alive + self._owned():
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(self._owned(), timeout=10)
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture()
def cluster():
    # Short path: Ray's Unix sockets live under the temp dir (107-byte limit).
    tmp = Path(tempfile.mkdtemp(prefix="wmn", dir="/tmp"))
    c = LocalCluster(tmp)
    try:
        yield c
    finally:
        c.stop()
        for log in c.logs:
            if log.exists():
                print(f"--- tail of {log.name}:\n{log.read_text(errors='replace')[-1500:]}")
        shutil.rmtree(tmp, ignore_errors=True)


def _start_node(
    c: LocalCluster, name: str, resources: dict, head: bool, gcs_port: int, dash_port: int = 0
):
    agent, agent_grpc, runtime_env, metrics, client = _free_ports(5)
    cmd = [
        str(BIN / "ray"),
        "start",
        "--block",
        "--num-cpus=2",
        "--num-gpus=0",
        f"--resources={json.dumps(resources)}",
        "--object-store-memory=300000000",
        "--node-ip-address=127.0.0.1",
        f"--temp-dir={c.tmp / 'ray'}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env}",
        f"--metrics-export-port={metrics}",
        "--disable-usage-stats",
    ]
    if head:
        cmd += [
            "--head",
            f"--port={gcs_port}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash_port}",
            f"--ray-client-server-port={client}",
        ]
    else:
        cmd += [f"--address=127.0.0.1:{gcs_port}"]
    return c.spawn(name, cmd, _env())


def test_job_submit_spreads_workers_over_two_nodes(cluster, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_actors, list_nodes

    t0 = time.monotonic()
    c = cluster
    gcs, dash, mlflow_port = _free_ports(3)
    dashboard = f"http://127.0.0.1:{dash}"

    _ensure_auth_token()
    head = _start_node(c, "head", {"node_a": 1, "train_slot": 1}, True, gcs, dash)
    # JobSubmissionClient connects (and authenticates) once the dashboard is up
    _wait("ray head", lambda: JobSubmissionClient(dashboard), 180, head, c.logs[-1])
    second = _start_node(c, "node_b", {"node_b": 1, "train_slot": 1}, False, gcs)
    alive = lambda: [n for n in list_nodes(address=dashboard) if n.state == "ALIVE"]  # noqa: E731
    _wait("second node", lambda: len(alive()) == 2, 180, second, c.logs[-1])
    nodes = {n.node_id: n for n in alive()}
    by_resource = {
        r: next(i for i, n in nodes.items() if r in n.resources_total) for r in ("node_a", "node_b")
    }
    assert len(set(by_resource.values())) == 2

    mlflow_env = _env()
    mlflow_env.update(
        MLFLOW_HOST="127.0.0.1",
        MLFLOW_PORT=str(mlflow_port),
        MLFLOW_BACKEND_URI=f"sqlite:///{c.tmp / 'mlflow' / 'mlflow.db'}",
        MLFLOW_ARTIFACTS=str(c.tmp / "mlflow" / "artifacts"),
        MLFLOW_WORKERS="1",
    )
    server = c.spawn("mlflow", ["bash", str(ROOT / "cluster/mlflow/server.sh")], mlflow_env)
    tracking = f"http://127.0.0.1:{mlflow_port}"
    _wait("mlflow server", lambda: _http_ok(f"{tracking}/health"), 180, server, c.logs[-1])
    t_up = time.monotonic() - t0

    run_name = f"multinode_{uuid.uuid4().hex[:6]}"
    submission_id = f"wsss_{run_name}"
    entry = [
        "python", "jobs/pretrain_pgseg.py", "--config", "configs/pgseg/tiny.yaml",
        f"run.name={run_name}", f"run.output_dir={c.tmp / 'out'}", f"tracking.uri={tracking}",
        f"train.max_steps={STEPS}", "train.log_every=2", f"train.ckpt_every={STEPS}",
        "train.batch_size_per_worker=16", "data.synthetic.num_images=256",
        "data.synthetic.image_size=64", "data.decode_actors=[1,1]", "eval.every=0",
        "scaling.num_workers=2", "scaling.resources_per_worker.train_slot=1",
    ]  # fmt: skip
    runtime_env = {"excludes": [".venv", ".git", "outputs", "mlruns", "*.tar", "__pycache__"]}
    submit = subprocess.run(
        [
            str(BIN / "ray"), "job", "submit", "--address", dashboard,
            "--submission-id", submission_id, "--working-dir", str(ROOT),
            "--runtime-env-json", json.dumps(runtime_env), "--no-wait", "--", *entry,
        ],
        env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert submit.returncode == 0, submit.stdout + submit.stderr

    jobs = JobSubmissionClient(dashboard)
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    _wait("job", lambda: jobs.get_job_status(submission_id) in terminal, 900)
    status = jobs.get_job_status(submission_id)
    logs = jobs.get_job_logs(submission_id)
    t_job = time.monotonic() - t0 - t_up
    print(f"multinode: cluster + MLflow up in {t_up:.0f}s, job {status} in {t_job:.0f}s")
    print(logs[-4000:])
    assert status == JobStatus.SUCCEEDED, logs[-6000:]
    assert "pgseg: 2 workers" in logs
    assert f"step {STEPS}/{STEPS}" in logs

    # where the train workers ran: one per node
    workers = list_actors(
        address=dashboard, filters=[("class_name", "=", "RayTrainWorker")], detail=True
    )
    assert len(workers) == 2, workers
    assert {w.node_id for w in workers} == set(by_resource.values())

    # the tracking server holds the run
    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name("wsss_ray")
    runs = client.search_runs([exp.experiment_id], f"tags.`wsss_ray.run_name` = '{run_name}'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["step"] == STEPS
    assert run.data.params["scaling.num_workers"] == "2"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
    assert steps == list(range(2, STEPS + 1, 2))
    assert "config.yaml" in [a.path for a in client.list_artifacts(run.info.run_id)]
    assert run.data.tags["checkpoint/final"].endswith(f"checkpoint_step_{STEPS:08d}")
