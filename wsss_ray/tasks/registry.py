"""The task registry: one :class:`TaskSpec` per method, in one table.

A spec says everything the system needs of a method: how to build it from its config, the checks
that need the model registry (before Ray starts), the tokenizer of its text tower, the data the
driver resolves, its training datasets, its periodic validation, its zero-shot / inference adapter
and how a Tune trial adjusts its config. The driver, the training loop, periodic validation and the
sweeps ask the spec; nothing else branches on ``cfg.task``.

Hooks are ``"module:attribute"`` strings (or callables), imported when first used: the table
imports no torch or Ray, and a spec pickles small. The driver resolves the spec once and ships it
to the train workers with the loop config, so a task registered at run time (a plugin, a test's
toy task) reaches them too, as long as the modules its hooks name import there.

Adding a method: a module with its Task (and hooks), and one line in :data:`TABLE`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from wsss_ray.config import ConfigError

Hook = str | Callable[..., Any] | None


def resolve(ref: Hook) -> Callable[..., Any] | None:
    """A hook's callable: ``"package.module:attr"`` imported, a callable as it is."""
    if ref is None or callable(ref):
        return ref
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def _none(*_args: Any, **_kwargs: Any) -> None:
    return None


@dataclass(frozen=True)
class TaskSpec:
    """What one method provides. Every hook takes the job's config first."""

    name: str
    #: the job config dataclass (its ``task`` field defaults to ``name``)
    schema: Hook
    #: ``(cfg, **task_args) -> Task`` inside a worker (after the process group exists)
    build: Hook
    #: ``(cfg) -> None``, raises ConfigError: checks that need the model registry, before Ray
    check: Hook = None
    #: ``(cfg) -> (open_clip tokenizer name, context length)`` of an image-text task
    tokenizer: Hook = None
    #: ``(cfg, output_dir) -> TrainData``: what the driver resolves before Ray (shards, a split)
    prepare: Hook = "wsss_ray.tasks.image_text:prepare"
    #: ``(cfg, data, skip_counter) -> {"train": Dataset}``: the Ray Datasets
    datasets: Hook = "wsss_ray.tasks.image_text:datasets"
    #: ``(cfg, val) -> validate(task, rank, world) -> confusion matrix`` (``eval.every``)
    validator: Hook = None
    #: ``(model, class_names, cfg-like, ...) -> segmenter``: inference on images
    segmenter: Hook = None
    #: ``(checkpoint, config_file) -> Segmenter``: the trained model for use on images (the
    #: training job logs it as the run's MLflow model)
    package: Hook = None
    #: ``(cfg) -> None``: a Tune trial's fix-ups before its run (paths made absolute, ...)
    trial_setup: Hook = None
    #: the job that runs it (and accepts a sweep's exported best config)
    job: str = ""
    #: Ray Tune sweeps may name it as their ``method`` (trials are Ray Train runs)
    sweep: bool = False

    def hook(self, name: str) -> Callable[..., Any]:
        """The named hook as a callable (a no-op for an unset optional one)."""
        return resolve(getattr(self, name)) or _none

    def has(self, name: str) -> bool:
        return getattr(self, name) is not None


@dataclass
class TrainData:
    """What ``prepare`` resolved: WebDataset shards, a segmentation source, and arguments the
    task's builder needs from the data (e.g. ``num_classes``)."""

    shards: list[str] = field(default_factory=list)
    source: Any = None
    task_args: dict[str, Any] = field(default_factory=dict)


#: the methods, by ``cfg.task``
TABLE: dict[str, TaskSpec] = {
    "clip": TaskSpec(
        "clip",
        schema="wsss_ray.config:ClipPretrainConfig",
        build="wsss_ray.tasks.clip:ClipTask",
        check="wsss_ray.tasks.clip:check_config",
        tokenizer="wsss_ray.tasks.clip:tokenizer_spec",
        job="jobs/pretrain_clip.py",
    ),
    "pgseg": TaskSpec(
        "pgseg",
        schema="wsss_ray.config:PGSegPretrainConfig",
        build="wsss_ray.tasks.pgseg:PGSegTask",
        check="wsss_ray.tasks.pgseg:check_config",
        tokenizer="wsss_ray.tasks.pgseg:tokenizer_spec",
        validator="wsss_ray.eval.periodic:zero_shot_validator",
        segmenter="wsss_ray.eval.pgseg:segmenter_for",
        package="wsss_ray.inference.segmenter:segmenter_from_run",
        job="jobs/pretrain_pgseg.py",
        sweep=True,
    ),
    "vpl_seg": TaskSpec(
        "vpl_seg",
        schema="wsss_ray.config:VPLTrainConfig",
        build="wsss_ray.tasks.vpl:VPLSegTask",
        check="wsss_ray.tasks.vpl:check_config",
        prepare="wsss_ray.tasks.vpl:prepare",
        datasets="wsss_ray.tasks.vpl:datasets",
        validator="wsss_ray.eval.periodic:decoder_validator",
        segmenter="wsss_ray.eval.vpl_seg:SegPredictor",
        package="wsss_ray.inference.segmenter:segmenter_from_run",
        trial_setup="wsss_ray.tasks.vpl:trial_setup",
        job="jobs/train_vpl.py",
        sweep=True,
    ),
}


def register(spec: TaskSpec) -> None:
    """Add (or replace) a method at run time."""
    TABLE[spec.name] = spec


def spec_for(cfg_or_name: Any) -> TaskSpec:
    """The spec of ``cfg.task`` (or of a task name); ConfigError for an unknown one."""
    name = cfg_or_name if isinstance(cfg_or_name, str) else getattr(cfg_or_name, "task", None)
    spec = TABLE.get(name)
    if spec is None:
        raise ConfigError(f"config error: task: unknown task '{name}' (known: {', '.join(TABLE)})")
    return spec
