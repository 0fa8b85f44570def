"""A rerun of a finished run says so and returns at once: no Ray, no data, no DeepSpeed (issue
24: ``make demo`` run twice took 92 s to find nothing to do). The storage is written by the test
in Ray Train's snapshot format, as a finished run leaves it."""

from __future__ import annotations

import json
import time

import pytest

from wsss_ray.config import PGSegPretrainConfig, load_config
from wsss_ray.train import driver


def _storage(tmp_path, step: int) -> str:
    run = tmp_path / "ray_results" / "pgseg_tiny"
    ckpt = run / f"checkpoint_step_{step:08d}"
    ckpt.mkdir(parents=True)
    result = {"checkpoint_dir_name": ckpt.name, "metrics": {"step": step, "loss": 1.5}}
    snapshot = {"checkpoint_results": [result], "latest_checkpoint_result": result}
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    return str(ckpt)


def _cfg(tmp_path, steps: int):
    return load_config(
        PGSegPretrainConfig,
        "configs/pgseg/tiny.yaml",
        [
            f"run.output_dir={tmp_path}",
            "run.name=pgseg_tiny",
            f"train.max_steps={steps}",
            "data.synthetic.num_images=64",  # what a run that starts writes first
        ],
    )


def _no_cluster(*args, **kwargs):
    raise AssertionError("a finished run must not start Ray or prepare data")


def test_a_finished_run_returns_at_once(tmp_path, monkeypatch, capsys):
    ckpt = _storage(tmp_path, 600)
    monkeypatch.setattr(driver, "init_ray", _no_cluster)
    monkeypatch.setattr(driver, "prepare", _no_cluster)
    t0 = time.monotonic()
    status, summary = driver.train_job(_cfg(tmp_path, 600))
    assert time.monotonic() - t0 < 5
    assert status == 0 and summary.checkpoint == ckpt and summary.metrics["step"] == 600
    out = capsys.readouterr().out
    assert "already finished (step 600)" in out and f"checkpoint: {ckpt}" in out


def test_an_unfinished_or_longer_run_goes_on(tmp_path, monkeypatch):
    _storage(tmp_path, 300)
    assert driver.finished_run(_cfg(tmp_path, 600)) is None  # stopped half-way: resume
    assert driver.finished_run(_cfg(tmp_path, 300)) is not None
    assert driver.finished_run(_cfg(tmp_path / "elsewhere", 300)) is None  # no storage yet
    monkeypatch.setattr(driver, "init_ray", _no_cluster)
    with pytest.raises(AssertionError, match="must not start Ray"):
        driver.run(_cfg(tmp_path, 600))  # goes on: reaches Ray (stopped here by the test)


def test_a_dead_tracking_server_ends_the_run_before_ray_starts(tmp_path, monkeypatch):
    """The MLflow server is asked before Ray starts: when it is down, the one-line error comes
    after the wait alone (``WSSS_RAY_MLFLOW_WAIT_S``), not after Ray's start-up too."""
    from wsss_ray.config import ConfigError

    monkeypatch.setenv("WSSS_RAY_MLFLOW_WAIT_S", "0")
    monkeypatch.setattr(driver, "init_ray", _no_cluster)
    cfg = _cfg(tmp_path, 600)
    cfg.tracking.uri = "http://127.0.0.1:9"  # the discard port: nothing listens
    with pytest.raises(ConfigError, match="MLflow at http://127.0.0.1:9 is unreachable"):
        driver.run(cfg)
