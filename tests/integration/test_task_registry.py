"""The task registry: a toy task registered at run time trains through the unchanged driver
(2 Ray Train workers, DeepSpeed, the image-text pipeline), and no module outside the registry
branches on ``cfg.task``."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_nothing_outside_the_registry_branches_on_the_task():
    out = subprocess.run(
        ["grep", "-rnE", r"cfg\.task (==|!=|in )", "wsss_ray", "jobs"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout
    assert out == "", out


def test_unknown_task_is_a_config_error():
    from wsss_ray.config import ConfigError
    from wsss_ray.tasks.registry import spec_for

    with pytest.raises(ConfigError, match=r"task: unknown task 'nope' \(known: clip, pgseg"):
        spec_for("nope")


def test_every_table_hook_resolves():
    from wsss_ray.tasks.registry import TABLE, resolve

    for spec in TABLE.values():
        for name in ("schema", "build", "check", "tokenizer", "prepare", "datasets", "validator",
                     "segmenter", "trial_setup"):  # fmt: skip
            ref = getattr(spec, name)
            assert ref is None or callable(resolve(ref)), (spec.name, name)
        assert resolve(spec.schema)().task == spec.name
    from wsss_ray.tune.spec import METHODS

    assert [m for m in METHODS] == ["pgseg", "vpl_seg", "vpl_prototypes"]


def test_a_registered_toy_task_trains_through_the_driver(tmp_path):
    import ray.cloudpickle
    import toy_task

    from wsss_ray.config import load_config
    from wsss_ray.tasks.registry import TABLE, register
    from wsss_ray.train.driver import run

    ray.cloudpickle.register_pickle_by_value(toy_task)  # the workers need not import it
    register(toy_task.SPEC)
    try:
        cfg = load_config(
            toy_task.ToyConfig,
            None,
            [
                f"run.output_dir={tmp_path}",
                "run.name=toy",
                "data.image_size=32",
                "data.synthetic.num_images=256",
                "data.synthetic.image_size=48",
                "train.max_steps=30",
                "train.batch_size_per_worker=16",
                "train.log_every=10",
                "train.ckpt_every=30",
                "optim.lr=1e-2",
                "tracking.enabled=false",
            ],
        )
        summary = run(cfg)
    finally:
        TABLE.pop("toy", None)
    m = summary.metrics
    assert m["step"] == 30 and summary.checkpoint
    assert re.search(r"checkpoint_step_0+30$", summary.checkpoint)
    assert m["toy_loss"] < 3.4657  # below chance for the global batch of 32 (log 32)
