"""A truncated newest checkpoint (issue 24: every resume failed with a 122-line traceback)
makes the resume fall back to the previous intact one with a warning, and the run finishes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests._jobs import ROOT, tiny_clip_job

pytestmark = pytest.mark.slow  # two training jobs, ~3 min on 2 cores


def _job(out: Path, steps: int) -> subprocess.CompletedProcess:
    args = tiny_clip_job(out, steps, "tracking.enabled=false")
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous(tmp_path):
    first = _job(tmp_path, 20)
    assert first.returncode == 0, first.stderr[-2000:]
    run = tmp_path / "ray_results" / "clip_tiny"
    latest = run / "checkpoint_step_00000020"
    assert sorted(p.name for p in latest.glob("manifest_rank*.json")) == [
        "manifest_rank0.json",
        "manifest_rank1.json",
    ]
    model = next(latest.rglob("mp_rank_00_model_states.pt"))
    model.write_bytes(model.read_bytes()[:1000])

    again = _job(tmp_path, 30)
    text = again.stdout + again.stderr
    assert again.returncode == 0, text[-3000:]
    assert f"checkpoint {latest} is damaged" in text, text[-3000:]
    assert "has 1,000 bytes" in text and "checkpoint_step_00000010 instead" in text
    assert "resuming at step 10" in text and "done: step 30" in text
