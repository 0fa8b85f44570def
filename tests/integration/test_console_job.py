"""The console of a real training job (issue 24, item 8): by default only the job's own lines,
Ray's and the libraries' output in console.log; a worker's failure still reaches the user;
--verbose shows Ray's output as Ray prints it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests._jobs import ROOT, tiny_clip_job

pytestmark = pytest.mark.slow  # three training jobs: ~4 min on 2 cores


def _run(out: Path, *extra: str, steps: int = 20) -> subprocess.CompletedProcess:
    args = tiny_clip_job(out, steps, "tracking.enabled=false", *extra)
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_default_console_is_the_jobs_own_lines(tmp_path):
    done = _run(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [ln for ln in done.stdout.splitlines() if ln.strip()]
    assert all(ln.startswith("[wsss_ray] ") for ln in lines), lines
    assert sum(ln.startswith("[wsss_ray] step ") for ln in lines) == 2  # steps 10 and 20
    log = tmp_path / "clip_tiny" / "console.log"
    assert f"[wsss_ray] Ray, DeepSpeed and library output: {log} (--verbose shows it here)" in lines
    assert "(RayTrainWorker pid=" not in done.stdout + done.stderr
    assert "\x1b[" not in done.stdout + done.stderr  # no colour codes
    text = log.read_text()
    assert "Started a local Ray instance" in text and "(RayTrainWorker pid=" in text
    assert "built successfully" in text  # DeepSpeed's op build, on the file only


def test_a_failing_worker_still_reaches_the_user(tmp_path):
    """16 images cannot fill a batch of 32: the worker raises; its error is on stderr at once,
    and the driver's traceback carries the worker's."""
    failed = _run(tmp_path, "data.synthetic.num_images=16")
    assert failed.returncode == 1
    err = failed.stderr
    assert "(RayTrainWorker pid=" in err and "RuntimeError: the training data yields no" in err
    assert "Traceback (most recent call last)" in err, err[-3000:]
    assert "use more data, fewer workers" in err.split("Traceback")[-1]


def test_verbose_shows_rays_output(tmp_path):
    done = _run(tmp_path, "--verbose", steps=10)
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout + done.stderr
    assert "(RayTrainWorker pid=" in text and "Started a local Ray instance" in text
    assert not (tmp_path / "clip_tiny" / "console.log").exists()
