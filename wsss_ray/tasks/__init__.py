"""One task per method: ``training_forward(batch) -> (losses, metrics)``; one loop serves all.
The methods and their hooks are in :mod:`wsss_ray.tasks.registry`; these helpers ask it."""

from __future__ import annotations

from typing import Any

from wsss_ray.tasks.base import Task
from wsss_ray.tasks.registry import TaskSpec, spec_for


def build_task(cfg: Any, spec: TaskSpec | None = None, **task_args: Any) -> Task:
    """The task named by ``cfg.task``, built from its config (inside a worker: after the process
    group exists, so distributed losses see the right rank); ``task_args`` are what the driver
    learned from the data (e.g. ``num_classes``)."""
    return (spec or spec_for(cfg)).hook("build")(cfg, **task_args)


def tokenizer_spec(cfg: Any) -> tuple[str, int | None]:
    """(open_clip tokenizer name, context length) for this task's text tower."""
    return spec_for(cfg).hook("tokenizer")(cfg)


def check_config(cfg: Any) -> None:
    """Task-level checks that need the model registry; raise ConfigError before Ray starts."""
    spec_for(cfg).hook("check")(cfg)
