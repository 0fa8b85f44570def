"""Sweeps end to end on a local Ray (jobs/sweep.py, wsss_ray.tune).

- PGSeg: 4 Optuna trials of the tiny model (1 worker, 8 steps, a report every 2) under ASHA on
  the image-text loss; every trial is a Ray Train run driven from a Tune function trainable with
  ``TuneReportCallback``; ASHA stops at least one trial before its last report; MLflow holds the
  sweep's parent run and one child per trial; the exported best config loads with the job's
  schema and ``jobs/pretrain_pgseg.py --print-config`` accepts it.
- VPL phase 1: features of a tiny CLIP cached once, then 20 cheap trials that each solve W on
  them (fractional CPUs, features from the object store); the best config runs with
  ``jobs/vpl_prototypes.py`` unchanged (reusing the cache) and reproduces the trial's score.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from jobs import sweep as sweep_job
from jobs import vpl_prototypes
from wsss_ray.config import (
    PGSegPretrainConfig,
    VPLConfig,
    load_config,
)
from wsss_ray.tune.trials import PARENT_TAG, TRIAL_TAG

ROOT = Path(__file__).resolve().parents[2]


def _runs(tmp_path: Path, sweep: str):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("wsss_ray")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    (parent,) = [r for r in runs if r.info.run_name == sweep]
    children = [r for r in runs if r.data.tags.get(PARENT_TAG) == parent.info.run_id]
    return client, parent, children


@pytest.mark.slow  # ~3.5 min on 2 cores; ASHA's early stop depends on noisy 2-report losses
def test_pgseg_sweep_asha_stops_early_and_exports_a_config(ray_local, tmp_path, capsys):
    rc = sweep_job.main(
        ["--sweep", "configs/sweeps/pgseg_tiny.yaml", f"output_dir={tmp_path}", "concurrency=1"]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    folder = tmp_path / "pgseg_tiny"
    results = json.loads((folder / "results.json").read_text())
    assert results["trials"] == 4 and results["errors"] == 0 and results["max_t"] == 4
    rows = (folder / "trials.csv").read_text().splitlines()[1:]
    reports = [int(r.split(",")[2]) for r in rows]
    print("reports per trial:", reports, "best", results["best_value"])
    assert len(reports) == 4 and max(reports) == 4
    assert min(reports) < 4  # ASHA stopped at least one trial before its last report
    assert results["early_stopped"] >= 1
    assert out.count("[wsss_ray] trial ") == 4 and "stopped early by ASHA" in out
    assert "best" in out and "trial  " in out  # progress lines and the final table

    client, parent, children = _runs(tmp_path, "pgseg_tiny")
    assert parent.data.params["sweep/method"] == "pgseg"
    assert parent.data.params["space/optim.lr"] == "loguniform[1e-06, 0.003]"
    assert parent.data.tags["best_trial_id"] == results["best_trial"]
    assert math.isclose(parent.data.metrics["best/it_loss"], results["best_value"])
    assert len(children) == 4
    for child in children:
        assert child.info.status == "FINISHED"
        trial = child.data.tags[TRIAL_TAG]
        assert child.info.run_name == f"pgseg_tiny_{trial}"
        history = client.get_metric_history(child.info.run_id, "it_loss")
        assert len(history) >= 1  # rank 0 logged the trial's reports into its child run
        assert "optim.lr" in child.data.params
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"best_config.yaml", "trials.csv", "sweep.yaml"} <= artifacts

    best = folder / "best_config.yaml"
    cfg = load_config(PGSegPretrainConfig, str(best), [])
    assert cfg.run.name == "pgseg_tiny_best" and cfg.scaling.num_workers == 1
    assert math.isclose(cfg.optim.lr, results["best_params"]["optim.lr"])
    assert cfg.npr.iters == results["best_params"]["npr.iters"]
    job = subprocess.run(
        [sys.executable, "jobs/pretrain_pgseg.py", "--config", str(best), "--print-config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert job.returncode == 0, job.stderr
    assert "name: pgseg_tiny_best" in job.stdout


TRIALS = 20  # configs/sweeps/vpl_tiny.yaml has 60 (docs/SWEEPS.md); 20 keep the suite short


def test_vpl_phase1_sweep_of_many_cheap_trials(ray_local, tiny_clip_checkpoint, tmp_path, capsys):
    rc = sweep_job.main(
        [
            "--sweep",
            "configs/sweeps/vpl_tiny.yaml",
            f"output_dir={tmp_path}",
            f"fixed.clip.weights={tiny_clip_checkpoint}",
            f"num_samples={TRIALS}",
            "concurrency=2",  # 0.5 CPU per trial (vpl_tiny.yaml), 2 at a time
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    folder = tmp_path / "vpl_tiny"
    results = json.loads((folder / "results.json").read_text())
    print(
        f"VPL phase 1: {results['trials']} trials in {results['seconds']:.1f}s "
        f"({results['trials_per_s']:.2f} trials/s), best patch mIoU {results['best_value']:.1f}"
    )
    assert results["trials"] == TRIALS and results["errors"] == 0
    assert out.count("[wsss_ray] trial ") == TRIALS
    # features were cached once, before the trials, in the job's own folder
    assert len(list((tmp_path / "vpl_tiny" / "features").glob("shard_*.npz"))) == 2

    client, parent, children = _runs(tmp_path, "vpl_tiny")
    assert len(children) == TRIALS
    values = sorted(c.data.metrics["patch/miou"] for c in children)
    assert values[-1] == pytest.approx(results["best_value"])
    assert values[0] < values[-1]  # the parameters matter
    for c in children[:5]:
        assert set(c.data.params) == {
            "prototypes.tau_i",
            "prototypes.tau_t",
            "prototypes.lam",
        }
        assert c.info.status == "FINISHED"

    # the best config runs with the job unchanged: same cached features, same W, same score
    best = folder / "best_config.yaml"
    cfg = load_config(VPLConfig, str(best), [])
    assert cfg.run.name == "vpl_tiny" and cfg.run.output_dir == str(tmp_path)
    assert cfg.prototypes.tau_i == pytest.approx(results["best_params"]["prototypes.tau_i"])
    capsys.readouterr()
    assert vpl_prototypes.main(["--config", str(best), "tracking.enabled=false"]) == 0
    assert "2 cached, 0 to compute" in capsys.readouterr().out
    report = json.loads((tmp_path / "vpl_tiny" / "prototypes.json").read_text())
    best_child = max(children, key=lambda c: c.data.metrics["patch/miou"])
    assert report["proto/patch_acc_vision_given_labels"] == pytest.approx(
        best_child.data.metrics["patch/acc"],
        abs=0.2,  # percent, both
    )
