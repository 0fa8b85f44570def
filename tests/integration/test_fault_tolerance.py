"""Fault tolerance of a real training run (tiny PGSeg, 2 workers, DeepSpeed ZeRO-2 on CPU,
embedded Ray, local MLflow):

- a train worker process is SIGKILLed mid-run, after the step-8 checkpoint: Ray Train
  (``run.max_failures=2``) restarts the worker group, which resumes from that checkpoint (not
  from step 0) and finishes at ``train.max_steps`` with the sample count of an uninterrupted
  run; a second run with the same ``run.name`` and more steps resumes from the final checkpoint
  into the same MLflow run;
- data faults in a full run: a truncated shard, a shard that is not a tar at all and a bad JPEG
  are skipped and counted in ``data/skipped`` (exactly, per epoch), never fatal.

Only processes of this test's own Ray (descendants of this process) are ever killed.
"""

from __future__ import annotations

import os
import signal
import tarfile
import threading
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from wsss_ray.config import PGSegPretrainConfig, load_config
from wsss_ray.data import synthetic as syn
from wsss_ray.data.shards import ShardSink
from wsss_ray.tracking import RUN_NAME_TAG
from wsss_ray.train.driver import run

pytestmark = pytest.mark.slow

B = 16  # per worker; 2 workers


def _cfg(out: Path, name: str, steps: int, *extra: str) -> PGSegPretrainConfig:
    return load_config(
        PGSegPretrainConfig,
        "configs/pgseg/tiny.yaml",
        [
            f"run.output_dir={out}",
            f"run.name={name}",
            f"train.max_steps={steps}",
            f"train.batch_size_per_worker={B}",
            "train.log_every=2",
            "train.ckpt_every=8",
            "run.max_failures=2",
            "data.synthetic.num_images=512",
            "data.synthetic.image_size=64",
            "data.decode_actors=[1,1]",
            "optim.warmup_steps=2",
            "eval.every=0",
            *extra,
        ],
    )


def _history(client: MlflowClient, run_id: str, key: str) -> list:
    return sorted(client.get_metric_history(run_id, key), key=lambda m: (m.timestamp, m.step))


class WorkerKiller(threading.Thread):
    """Waits until the step-``ckpt`` checkpoint is in storage and rank 0 has reported step
    ``after`` (so steps since the checkpoint are lost), then SIGKILLs one RayTrainWorker process
    of this test's Ray."""

    def __init__(self, storage: Path, uri: str, name: str, ckpt: int, after: int):
        super().__init__(daemon=True)
        self.ckpt_dir = storage / name / f"checkpoint_step_{ckpt:08d}"
        self.uri, self.name, self.after = uri, name, after
        self.done = threading.Event()
        self.killed_pid: int | None = None
        self.step_at_kill: int | None = None
        self.kill_time_ms: int | None = None
        self.error: BaseException | None = None

    def reported_step(self) -> int:
        client = MlflowClient(self.uri)
        exp = client.get_experiment_by_name("wsss_ray")
        if exp is None:
            return -1
        runs = client.search_runs([exp.experiment_id], f"tags.`{RUN_NAME_TAG}` = '{self.name}'")
        return int(runs[0].data.metrics.get("step", -1)) if runs else -1

    @staticmethod
    def train_workers() -> list[psutil.Process]:
        found = []
        for proc in psutil.Process(os.getpid()).children(recursive=True):
            try:
                if " ".join(proc.cmdline()).startswith("ray::RayTrainWorker"):
                    found.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return found

    def run(self) -> None:
        try:
            while not self.done.is_set():
                if self.ckpt_dir.exists():
                    step = self.reported_step()
                    workers = self.train_workers()
                    if step >= self.after and workers:
                        victim = workers[-1]
                        self.step_at_kill = step
                        self.kill_time_ms = int(time.time() * 1000)
                        os.kill(victim.pid, signal.SIGKILL)
                        self.killed_pid = victim.pid
                        return
                time.sleep(0.2)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            self.error = err


def test_worker_kill_resumes_from_checkpoint_and_rerun_resumes(ray_local, tmp_path):
    name, steps = "ft", 24
    cfg = _cfg(tmp_path, name, steps)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    killer = WorkerKiller(tmp_path / "ray_results", uri, name, ckpt=8, after=10)
    killer.start()
    t0 = time.monotonic()
    try:
        first = run(cfg)
    finally:
        killer.done.set()
        killer.join(timeout=10)
    t_first = time.monotonic() - t0
    assert killer.error is None, killer.error
    assert killer.killed_pid is not None, "the run finished before a worker could be killed"
    assert not psutil.pid_exists(killer.killed_pid) or (
        psutil.Process(killer.killed_pid).status() == psutil.STATUS_ZOMBIE
    )

    client = MlflowClient(first.tracking_uri)
    rid = first.mlflow_run_id
    resumed = [int(m.value) for m in _history(client, rid, "resumed_from_step")]
    after_kill = [
        m.step for m in _history(client, rid, "loss") if m.timestamp > killer.kill_time_ms
    ]
    print(
        f"worker kill: killed pid {killer.killed_pid} with step {killer.step_at_kill} reported; "
        f"resumed_from_step history {resumed}; final step {first.metrics['step']}; "
        f"loss steps logged after the kill {after_kill}; {t_first:.0f}s"
    )
    # restarted once, from the step-8 checkpoint, which is older than the kill
    assert resumed == [0, 8], resumed
    assert 10 <= killer.step_at_kill < steps
    # nothing after the kill went back to step 0; it replayed from 8 to the end
    assert after_kill and min(after_kill) > 8 and after_kill[-1] == steps
    assert first.metrics["step"] == steps
    assert first.metrics["samples"] == steps * B * 2  # as if never interrupted
    assert first.checkpoint.endswith(f"checkpoint_step_{steps:08d}")
    assert client.get_run(rid).info.status == "FINISHED"

    # the same name again, further: resumes from the final checkpoint, same MLflow run
    t1 = time.monotonic()
    second = run(_cfg(tmp_path, name, steps + 8))
    t_second = time.monotonic() - t1
    print(f"rerun with the same name: final step {second.metrics['step']}; {t_second:.0f}s")
    assert second.mlflow_run_id == rid
    assert [int(m.value) for m in _history(client, rid, "resumed_from_step")] == [0, 8, steps]
    assert second.metrics["step"] == steps + 8
    assert second.metrics["samples"] == (steps + 8) * B * 2
    assert second.checkpoint.endswith(f"checkpoint_step_{steps + 8:08d}")


def _faulty_shards(folder: Path) -> tuple[list[str], int]:
    """64 good samples (= 2 workers x 4 batches of 8: every row is consumed each epoch, so the
    count is exact) and three faults per epoch: a bad JPEG, a truncated tar, a non-tar file.
    Returns (paths, faults per epoch)."""
    scenes = list(syn.scenes(24 + 1 + 25 + 24, seed=7, size=64))

    def write(sink, scene, jpeg=None):
        sink.write(scene.key, scene.jpeg() if jpeg is None else jpeg, scene.caption, scene.meta())

    with ShardSink(folder, "a", samples_per_shard=1000) as sink:  # 24 good + a bad JPEG
        for i, s in enumerate(scenes[:24]):
            if i == 12:
                write(sink, scenes[24], jpeg=b"\xff\xd8\xff\xe0 not a jpeg at all")
            write(sink, s)
    with ShardSink(folder, "b", samples_per_shard=1000) as sink:  # cut in sample 17 of 25: 16 left
        for s in scenes[25:50]:
            write(sink, s)
    path_b = sink.paths[0]
    with tarfile.open(path_b) as tf:
        cut = next(m for m in tf.getmembers() if m.name == f"{scenes[25 + 16].key}.jpg")
    data = Path(path_b).read_bytes()
    Path(path_b).write_bytes(data[: cut.offset_data + 200])
    with ShardSink(folder, "c", samples_per_shard=1000) as sink:  # 24 good
        for s in scenes[50:74]:
            write(sink, s)
    (folder / "d-000000.tar").write_bytes(os.urandom(3000))  # not a tar at all
    paths = sorted(str(p) for p in folder.glob("*.tar"))
    assert len(paths) == 4
    return paths, 3


@pytest.mark.parametrize("passes", [1, 2])
def test_corrupt_shard_and_bad_jpeg_are_skipped_and_counted(ray_local, tmp_path, passes):
    """Exact skip counts over two executions of the data (passes = 2: each execution reads
    every shard twice, so 4 epochs)."""
    shards = tmp_path / "shards"
    shards.mkdir()
    paths, faults = _faulty_shards(shards)
    epochs, steps_per_epoch = 2 * passes, 64 // (2 * 8)
    t0 = time.monotonic()
    summary = run(
        _cfg(
            tmp_path,
            "faults",
            epochs * steps_per_epoch,
            f"data.train_shards=[{shards}]",
            "train.batch_size_per_worker=8",
            "train.log_every=1",
            "data.decode_batch_size=4",  # many decode batches, some all bad: counted exactly
            f"data.passes_per_execution={passes}",
        )
    )
    print(
        f"data faults: {summary.metrics['data/skipped']} skipped over {epochs} epochs, "
        f"{summary.metrics['samples']} samples; {time.monotonic() - t0:.0f}s"
    )
    assert summary.metrics["step"] == epochs * steps_per_epoch
    assert summary.metrics["epoch"] == epochs - passes  # the last execution's first epoch
    assert summary.metrics["samples"] == epochs * 64
    assert summary.metrics["data/skipped"] == epochs * faults
    client = MlflowClient(summary.tracking_uri)
    skipped = _history(client, summary.mlflow_run_id, "data/skipped")
    assert skipped[-1].value == epochs * faults
    assert len(paths) == 4
