"""Ctrl-C and SIGTERM stop a training job within seconds (issue 24): the job names its last
checkpoint, exits 130 / 143 and leaves no Ray process behind; the same command resumes from
that checkpoint. Each test runs the job as a subprocess, as a user would."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests._jobs import ROOT, tiny_clip_job


def _job(out: Path, steps: int) -> list[str]:
    return tiny_clip_job(out, steps, "tracking.enabled=false")


def _stop_after_first_checkpoint(out: Path, sig: signal.Signals) -> tuple[int, float, str]:
    proc = subprocess.Popen(
        _job(out, 2000),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    try:
        deadline = time.monotonic() + 300
        seen = 0  # stop after the second checkpoint: the first is registered by then
        for line in proc.stdout:
            seen += "[checkpoint]" in line
            if seen == 2 or time.monotonic() > deadline:
                break
        t0 = time.monotonic()
        proc.send_signal(sig)
        rest = proc.stdout.read()
        rc = proc.wait(timeout=60)
        return rc, time.monotonic() - t0, rest
    finally:
        if proc.poll() is None:
            proc.kill()


pytestmark = pytest.mark.slow  # two training jobs per signal: ~2 min each on 2 cores


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_the_job_names_the_checkpoint_and_the_rerun_resumes(tmp_path, sig):
    rc, took, rest = _stop_after_first_checkpoint(tmp_path, sig)
    assert rc == 128 + sig, rest[-2000:]
    assert took < 15, took
    line = next(ln for ln in rest.splitlines() if ln.startswith(f"[wsss_ray] {sig.name}"))
    ckpt = line.split("Last checkpoint: ")[1].split(";")[0]
    assert Path(ckpt).is_dir(), line  # a checkpoint Ray Train registered: 10 or 20
    step = int(ckpt.rsplit("_", 1)[1])
    assert step in (10, 20), line
    time.sleep(3)  # the embedded Ray's processes end with ray.shutdown
    import psutil

    left = [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if str(tmp_path) in " ".join(p.info["cmdline"] or [])
    ]
    assert not left, left

    # the same command: resumes at the step named, not 0
    done = subprocess.run(
        _job(tmp_path, step + 10), cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = done.stdout + done.stderr
    assert f"resuming at step {step}" in out and f"done: step {step + 10}" in out, out[-2000:]
