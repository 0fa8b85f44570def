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
    #: the run's data plan actor (:mod:`wsss_ray.data.position`), set by the driver
    data_plan: str | None = None


#: the attribute of a method's module that a hook in ``_method``'s ``own`` names, where it is
#: not the hook's own name
_OWN_NAMES = {"check": "check_config", "tokenizer": "tokenizer_spec"}

#: the hooks of a method whose trained model segments images: packaged as the run's MLflow
#: model, and Tune sweeps may name it
_SEGMENTER = {"package": "wsss_ray.inference.segmenter:segmenter_from_run", "sweep": True}


def _method(
    name: str, build: str, schema: str, own: tuple[str, ...] = (), **hooks: Any
) -> TaskSpec:
    """A :data:`TABLE` entry, written short: ``build`` is ``"module:Task"``, ``schema`` a class
    of :mod:`wsss_ray.config`, and each hook named in ``own`` is an attribute of the method's
    own module (named as in :data:`_OWN_NAMES`, else as the hook); ``hooks`` the rest."""
    module = build.partition(":")[0]
    hooks |= {hook: f"{module}:{_OWN_NAMES.get(hook, hook)}" for hook in own}
    return TaskSpec(name, schema=f"wsss_ray.config:{schema}", build=build, **hooks)


#: the methods, by ``cfg.task``
TABLE: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        _method(
            "clip",
            "wsss_ray.tasks.clip:ClipTask",
            "ClipPretrainConfig",
            ("check", "tokenizer"),
            job="jobs/pretrain_clip.py",
        ),
        _method(
            "pgseg",
            "wsss_ray.tasks.pgseg:PGSegTask",
            "PGSegPretrainConfig",
            ("check", "tokenizer"),
            validator="wsss_ray.eval.periodic:zero_shot_validator",
            segmenter="wsss_ray.eval.pgseg:segmenter_for",
            job="jobs/pretrain_pgseg.py",
            **_SEGMENTER,
        ),
        _method(
            "vpl_seg",
            "wsss_ray.tasks.vpl:VPLSegTask",
            "VPLTrainConfig",
            ("check", "prepare", "datasets", "trial_setup"),
            validator="wsss_ray.eval.periodic:decoder_validator",
            segmenter="wsss_ray.eval.vpl_seg:SegPredictor",
            job="jobs/train_vpl.py",
            **_SEGMENTER,
        ),
    )
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
