"""Every job has --help; a config error exits 2 with one line, before any Ray work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
JOBS = sorted(p.name for p in (ROOT / "jobs").glob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("job", JOBS)
def test_help(job):
    out = subprocess.run(
        [sys.executable, f"jobs/{job}", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "usage:" in out.stdout


def test_config_error_is_one_line_before_ray():
    out = subprocess.run(
        [sys.executable, "jobs/pretrain_clip.py", "train.max_stepz=3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip() == "config error: unknown key 'train.max_stepz'"
    assert "Ray" not in out.stdout + out.stderr


def test_bad_model_name_caught_before_ray():
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from wsss_ray.config import *; from wsss_ray.tasks import check_config;"
            "check_config(load_config(ClipPretrainConfig, 'configs/clip/tiny.yaml',"
            " ['data.image_size=96']))",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0 and "data.image_size: wsss-tiny takes 64px" in out.stderr
