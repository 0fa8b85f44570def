"""Sweep files (configs/sweeps/*.yaml) parse into typed specs and Tune distributions; every
mistake is one line naming the key, raised before Ray starts; jobs/sweep.py exits 2 on it."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from ray import tune

from wsss_ray.config import PGSegPretrainConfig, load_config
from wsss_ray.tune.spec import (
    SweepError,
    config_key_kind,
    load_sweep,
    spec_yaml,
    tune_space,
)

ROOT = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return str(path)


BASE = """
name: s
method: pgseg
base_config: configs/pgseg/tiny.yaml
metric: it_loss
mode: min
num_samples: 3
parameters:
  optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
"""


def test_pgseg_sweep_parses_into_tune_distributions():
    spec = load_sweep("configs/sweeps/pgseg.yaml")
    assert spec.method == "pgseg" and spec.metric == "it_loss" and spec.mode == "min"
    space = tune_space(spec)
    assert set(space) == {
        "hrs.phi",
        "loss.pg",
        "loss.pg_text",
        "npr.iters",
        "npr.momentum",
        "optim.lr",
        "model.gumbel_tau",
    }
    assert isinstance(space["hrs.phi"], tune.search.sample.Float)
    assert (space["hrs.phi"].lower, space["hrs.phi"].upper) == (0.0, 0.3)
    assert isinstance(space["optim.lr"].sampler, tune.search.sample.LogUniform)
    assert isinstance(space["npr.iters"], tune.search.sample.Integer)
    assert (space["npr.iters"].lower, space["npr.iters"].upper) == (3, 16)
    assert isinstance(space["model.gumbel_tau"], tune.search.sample.Categorical)
    assert space["model.gumbel_tau"].categories == [0.5, 1.0, 2.0]
    # sampled values land in the job's schema with the right types
    for _ in range(5):
        values = {k: d.sample() for k, d in space.items()}
        assert 3 <= values["npr.iters"] < 16
        assert 3e-4 <= values["optim.lr"] <= 3e-3
        overrides = [f"{k}={v}" for k, v in values.items()]
        cfg = load_config(PGSegPretrainConfig, spec.base_config, overrides)
        assert cfg.npr.iters == values["npr.iters"] and isinstance(cfg.npr.iters, int)
        assert math.isclose(cfg.optim.lr, values["optim.lr"])


def test_vpl_sweep_stages(tmp_path):
    # the shipped file points at the demo's CLIP and phase-1 folder: stand-ins here, so the test
    # does not depend on `make demo-vpl` having run in this checkout
    weights = tmp_path / "clip.pt"
    weights.write_bytes(b"x")
    phase1 = tmp_path / "vpl_tiny"
    (phase1 / "pseudo_labels_vision").mkdir(parents=True)
    (phase1 / "prototypes.pt").write_bytes(b"x")
    ours = [f"fixed.clip.weights={weights}"]
    first = load_sweep("configs/sweeps/vpl.yaml", ours)
    assert first.stage == "prototypes" and first.method == "vpl_prototypes"
    assert first.name == "vpl_prototypes" and first.scheduler.kind == "fifo"
    assert set(first.parameters) == {"prototypes.tau_i", "prototypes.tau_t", "prototypes.lam"}
    assert first.searcher.seed == 0 and first.output_dir == "outputs/demo"  # shared keys
    seeds = load_sweep("configs/sweeps/vpl.yaml", ["stage=seeds", *ours])
    assert seeds.score == "seeds" and seeds.metric == "seed/miou"
    assert {"cam.box_thresh", "cam.alpha"} <= set(seeds.parameters)
    decoder = load_sweep(
        "configs/sweeps/vpl.yaml",
        ["stage=decoder", "num_samples=3", *ours, f"fixed.phase1.folder={phase1}"],
    )
    assert decoder.method == "vpl_seg" and decoder.scheduler.kind == "asha"
    assert set(decoder.parameters) == {"rsc.weight", "rsc.tau", "optim.lr"}
    assert decoder.num_samples == 3
    with pytest.raises(SweepError, match=r"^sweep error: stage: 'nope' is not one of"):
        load_sweep("configs/sweeps/vpl.yaml", ["stage=nope"])


def test_overrides_of_the_sweep_file(tmp_path):
    path = _write(tmp_path, BASE)
    spec = load_sweep(
        path,
        [
            "num_samples=7",
            "fixed.train.max_steps=5",
            "parameters.hrs.phi.uniform=[0.0,0.2]",
            "scheduler.max_t=3",
        ],
    )
    assert spec.num_samples == 7 and spec.scheduler.max_t == 3
    assert spec.fixed == {"train.max_steps": 5}
    assert spec.parameters["hrs.phi"] == {"uniform": [0.0, 0.2]}
    assert "train.max_steps=5" in spec.fixed_overrides()
    # the resolved spec reloads to the same thing
    again = load_sweep(_write(tmp_path, spec_yaml(spec)))
    assert again.parameters == spec.parameters and again.fixed == spec.fixed


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            "  optim.lrr: {uniform: [0, 1]}\n",
            "sweep error: parameters.optim.lrr: no such key in the pgseg job config "
            "(PGSegPretrainConfig)",
        ),
        (
            "  optim: {uniform: [0, 1]}\n",
            "sweep error: parameters.optim: is a config section, not a value",
        ),
        (
            "  run.name: {choice: [a, b]}\n",
            "sweep error: parameters.run.name: set by the sweep itself; not searchable",
        ),
        (
            "  hrs.phi: {normal: [0, 1]}\n",
            "sweep error: parameters.hrs.phi: unknown distribution 'normal'",
        ),
        (
            "  hrs.phi: 0.1\n",
            "sweep error: parameters.hrs.phi: give one distribution",
        ),
        (
            "  hrs.phi: {uniform: [0.3, 0.1]}\n",
            "sweep error: parameters.hrs.phi: uniform needs low < high, got [0.3, 0.1]",
        ),
        (
            "  loss.pg: {loguniform: [0, 1]}\n",
            "sweep error: parameters.loss.pg: loguniform needs low > 0",
        ),
        (
            "  npr.iters: {randint: [1.5, 4]}\n",
            "sweep error: parameters.npr.iters: randint needs integers",
        ),
        (  # a value of the wrong type for the schema, caught by probing the range
            "  npr.iters: {uniform: [1, 4]}\n",
            "sweep error: parameters.npr.iters = 1.0: config error: npr.iters: Value '1.0'",
        ),
        (  # a value the job's own validation refuses
            "  train.log_every: {randint: [0, 4]}\n",
            "sweep error: parameters.train.log_every = 0: config error: train.log_every: "
            "must be > 0",
        ),
        (
            "  model.gumbel_tau: {choice: []}\n",
            "sweep error: parameters.model.gumbel_tau: choice needs a non-empty list",
        ),
    ],
)
def test_bad_parameters_are_one_line_naming_the_key(tmp_path, edit, message):
    path = _write(tmp_path, BASE + edit)
    with pytest.raises(SweepError) as err:
        load_sweep(path)
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(message), text


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method=segformer"], "sweep error: method: one of pgseg | vpl_seg | vpl_prototypes"),
        (["mode=maximum"], "sweep error: mode: max | min"),
        (["num_sampels=3"], "sweep error: unknown sweep key 'num_sampels'"),
        (["fixed.train.max_stepz=3"], "sweep error: fixed.train.max_stepz: no such key"),
        (["fixed.run.output_dir=/x"], "sweep error: fixed.run.output_dir: set by the sweep"),
        (["base_config=nope.yaml"], "sweep error: base_config: no such file: nope.yaml"),
        (["scheduler.kind=hyperband"], "sweep error: scheduler.kind: asha | fifo"),
        (["num_samples=two"], "sweep error: num_samples: Value 'two' of type 'str'"),
        (
            ["fixed.train.batch_size_per_worker=0"],
            "sweep error: base_config + fixed: config error: train.batch_size_per_worker: "
            "must be > 0",
        ),
    ],
)
def test_bad_sweep_keys(tmp_path, overrides, message):
    path = _write(tmp_path, BASE)
    with pytest.raises(SweepError) as err:
        load_sweep(path, overrides)
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(message), str(err.value)


def test_phase1_sweeps_need_fifo_and_a_reported_metric(tmp_path):
    text = """
method: vpl_prototypes
base_config: configs/vpl/tiny.yaml
fixed: {clip.weights: configs}
metric: patch/miou
scheduler: {kind: fifo}
parameters:
  prototypes.lam: {loguniform: [1.0e-6, 1.0e-2]}
"""
    path = _write(tmp_path, text)
    assert load_sweep(path).metric == "patch/miou"
    with pytest.raises(SweepError, match="report once"):
        load_sweep(path, ["scheduler.kind=asha"])
    with pytest.raises(SweepError, match="score=patch report patch/miou"):
        load_sweep(path, ["metric=seed/miou"])
    assert load_sweep(path, ["metric=seed/miou", "score=seeds"]).score == "seeds"


def test_config_key_kind():
    assert config_key_kind(PGSegPretrainConfig, "optim.lr") == "value"
    assert config_key_kind(PGSegPretrainConfig, "optim") == "section"
    assert config_key_kind(PGSegPretrainConfig, "optim.lr.x") == "unknown"
    assert config_key_kind(PGSegPretrainConfig, "npr.iterz") == "unknown"


def test_job_exits_2_with_one_line_before_ray(tmp_path):
    path = _write(tmp_path, BASE + "  hrs.phy: {uniform: [0, 1]}\n")
    out = subprocess.run(
        [sys.executable, "jobs/sweep.py", "--sweep", path],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "sweep error: parameters.hrs.phy: no such key in the pgseg job config (PGSegPretrainConfig)"
    )
    assert "Ray" not in out.stdout + out.stderr


def test_child_runs_close_early_stopped_train_trials_as_finished(tmp_path):
    """A Train trial that ASHA stops may have closed its own run as FAILED (interrupted inside
    trainer.fit) or left it RUNNING (killed): either way the sweep records it as FINISHED with
    the early-stop tag; a trial that really failed stays FAILED."""
    from mlflow.tracking import MlflowClient

    from wsss_ray.tune.runs import ChildRuns, TrialRow
    from wsss_ray.tune.trials import PARENT_TAG, TRIAL_TAG

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("sweeps")
    parent = client.create_run(exp).info.run_id
    own_status = {"t_killed": None, "t_interrupted": "FAILED", "t_done": "FINISHED", "t_bad": None}
    for trial, status in own_status.items():  # what each trial's own tracker left behind
        run = client.create_run(exp, tags={PARENT_TAG: parent, TRIAL_TAG: trial})
        if status:
            client.set_terminated(run.info.run_id, status=status)
    children = ChildRuns(uri, exp, parent, "s", train=True)
    for trial, ok, early in [
        ("t_killed", "ok", True),
        ("t_interrupted", "ok", True),
        ("t_done", "ok", False),
        ("t_bad", "error", False),
    ]:
        children.add(TrialRow(trial, ok, 2, 0.5, early, 1.0, {}))
    children.close()
    assert children.errors == []
    got = {
        r.data.tags[TRIAL_TAG]: (r.info.status, r.data.tags["wsss_ray.early_stopped"])
        for r in client.search_runs([exp], filter_string=f"tags.`{PARENT_TAG}` = '{parent}'")
    }
    assert got == {
        "t_killed": ("FINISHED", "true"),
        "t_interrupted": ("FINISHED", "true"),
        "t_done": ("FINISHED", "false"),
        "t_bad": ("FAILED", "false"),
    }
