"""A diverged run is not a success (issue 24): with optim.lr=1e3 the tiny CLIP's loss freezes
(no NaN ever appears); the job warns, marks the run diverged and exits 1."""

from __future__ import annotations

import subprocess

import pytest

from tests._jobs import ROOT, tiny_clip_job

pytestmark = pytest.mark.slow  # one training job, ~1 min on 2 cores


def test_a_frozen_loss_warns_and_exits_1(tmp_path):
    args = tiny_clip_job(tmp_path, 40, "optim.lr=1e3", "train.log_every=5", "train.ckpt_every=40")
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-3000:]
    assert "for 5 reports in a row: the run has diverged or stalled" in text
    assert "never recovered" in text

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("wsss_ray").experiment_id])
    assert run.info.status == "FAILED" and run.data.metrics["diverged"] == 1
