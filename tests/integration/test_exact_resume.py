"""Exact, elastic mid-epoch resume (issue 25): the tiny CLIP job with 2 workers is killed
(SIGKILL of the driver and every process under it, as a preempted node) in the middle of its
first epoch; the same command with 1 worker resumes from the last checkpoint. By sample key, the
samples consumed before that checkpoint and those consumed after the resume in the same epoch
are disjoint and together are the whole epoch, exactly.

The record comes from ``data.record_samples`` (each worker's consumed ids per report)."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from tests._jobs import ROOT, tiny_clip_job
from wsss_ray.data.position import epochs_of, unpack
from wsss_ray.data.shard_reading import iter_tar_samples

pytestmark = pytest.mark.slow  # two training jobs: ~2-3 min on 2 cores

N, PER_SHARD, B = 256, 32, 8  # 8 shards; 2 workers x 8 = 16 samples a step: 16 steps an epoch


def _job(out: Path, workers: int) -> list[str]:
    return tiny_clip_job(
        out,
        40,
        "tracking.enabled=false",
        f"scaling.num_workers={workers}",
        f"train.batch_size_per_worker={B}",
        "train.ckpt_every=5",
        "train.log_every=5",
        f"data.synthetic.num_images={N}",
        f"data.synthetic.samples_per_shard={PER_SHARD}",
        "data.synthetic.image_size=64",
        "data.record_samples=true",
    )


def _kill_tree(proc: subprocess.Popen) -> None:
    root = psutil.Process(proc.pid)
    tree = [root, *root.children(recursive=True)]
    for p in tree:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=30)


def _record(folder: Path, files: list[Path], max_step: int | None = None) -> np.ndarray:
    rows = [
        np.load(f)
        for f in files
        if max_step is None or int(re.search(r"step(\d+)", f.name).group(1)) <= max_step
    ]
    return np.concatenate(rows) if rows else np.zeros((0, 2), np.int64)


def test_kill_mid_epoch_and_resume_with_fewer_workers_sees_each_sample_once(tmp_path):
    run_dir = tmp_path / "ray_results" / "clip_tiny"
    samples = run_dir / "samples"
    proc = subprocess.Popen(
        _job(tmp_path, 2),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,
    )
    log = []
    try:
        deadline = time.monotonic() + 400
        for line in proc.stdout:
            log.append(line)
            # the step-10 checkpoint is registered: kill in the middle of epoch 0 (16 steps)
            if "step 10/40" in line and "[checkpoint]" in line:
                break
            assert time.monotonic() < deadline, "".join(log[-30:])
    finally:
        _kill_tree(proc)
    assert any("step 10/40" in ln for ln in log), "".join(log[-30:])
    before = sorted(samples.glob("*.npy"))
    assert before, "no record written"

    done = subprocess.run(_job(tmp_path, 1), cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    step = int(re.search(r"1 workers, 40 steps, resuming at step (\d+)", out).group(1))
    # the newest checkpoint Ray Train had registered when the kill came (10, or 5 when the
    # step-10 one was still being registered), mid-epoch either way
    assert step in (5, 10, 15), out[-3000:]
    passed = int(re.search(r"resuming mid-epoch: (\d+) samples consumed", out).group(1))
    assert passed == 2 * B * step, out[-3000:]  # every sample of those steps, and no more

    tars = (tmp_path / "clip_tiny" / "shards.txt").read_text().split()
    assert len(tars) == N // PER_SHARD
    keys = {}
    for s, tar in enumerate(tars):
        with open(tar, "rb") as f:
            for i, sample in enumerate(iter_tar_samples(f, tar)):
                keys[(s, i)] = sample["__key__"]
    assert len(keys) == N

    def seen(rows: np.ndarray) -> list[str]:
        rows = rows[epochs_of(rows, len(tars)) == 0]  # the interrupted epoch only
        _, shard, index = unpack(rows[:, 1], len(tars))
        return [keys[(s, i)] for s, i in zip(shard.tolist(), index.tolist())]

    first = seen(_record(samples, before, max_step=step))  # up to the checkpoint resumed
    after = sorted(set(samples.glob("*.npy")) - set(before))
    second = seen(_record(samples, after))
    assert len(first) == len(set(first)) == 2 * B * step
    assert len(second) == len(set(second)) == N - 2 * B * step  # 1 worker: 8 a step
    assert not set(first) & set(second)
    assert set(first) | set(second) == set(keys.values())  # the epoch, exactly
    # the resumed run went on into epoch 1 with every sample again
    last = _record(samples, after)
    assert (epochs_of(last, len(tars)) == 1).sum() == B * (40 - step) - len(second)
