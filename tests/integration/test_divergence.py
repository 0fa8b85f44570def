"""A diverged run is not a success (issue 24): with optim.lr=1e3 the tiny CLIP's loss freezes
(no NaN ever appears); the job warns, marks the run diverged and exits 1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # one training job, ~1 min on 2 cores


def test_a_frozen_loss_warns_and_exits_1(tmp_path):
    args = [
        sys.executable,
        "jobs/pretrain_clip.py",
        "--config",
        "configs/clip/tiny.yaml",
        f"run.output_dir={tmp_path}",
        "optim.lr=1e3",
        "train.max_steps=40",
        "train.log_every=5",
        "train.ckpt_every=40",
        "data.synthetic.num_images=256",
    ]
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-3000:]
    assert "for 5 reports in a row: the run has diverged or stalled" in text
    assert "never recovered" in text

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("wsss_ray").experiment_id])
    assert run.info.status == "FAILED" and run.data.metrics["diverged"] == 1
