"""The Ray Train driver: typed config in, a finished (or resumed) training run out.

``run(cfg)`` prepares data (synthetic shards when none are given), writes the resolved config,
starts or joins Ray (embedded local cluster by default; ``RAY_ADDRESS`` / ``ray job submit``
joins a cluster unchanged), opens the MLflow run and fits a ``TorchTrainer``. The same
``storage_path`` + ``run.name`` resumes from the last checkpoint, in Ray and in MLflow.
``prepare`` + ``build_trainer`` are its two halves, reused by the Tune sweeps (``wsss_ray.tune``),
whose per-trial driver adds its own MLflow child run and ``TuneReportCallback``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsss_ray.config import TrainJobConfig, save_resolved, to_flat_dict
from wsss_ray.runtime import start_ray
from wsss_ray.tracking import Tracker, local_artifact_location, tracking_uri


@dataclass
class RunSummary:
    metrics: dict[str, Any]
    checkpoint: str | None
    tracking_uri: str
    mlflow_run_id: str | None
    output_dir: str
    error: BaseException | None = None


def init_ray(cfg: TrainJobConfig) -> None:
    """Join ``RAY_ADDRESS`` when set, else an embedded local Ray with enough logical CPUs for
    the train workers plus the decode actors."""
    d, s = cfg.data, cfg.scaling
    needed = s.num_workers * s.cpus_per_worker + d.decode_actors[1] * d.cpus_per_decode_actor + 1
    start_ray(needed, cfg.ray.num_cpus)


def train_shards(cfg: TrainJobConfig) -> list[str]:
    if cfg.task == "vpl_seg":
        return []  # a segmentation split with pseudo-labels, not WebDataset shards
    if cfg.data.train_shards:
        return list(cfg.data.train_shards)
    from wsss_ray.data.synthetic import ensure_synthetic_shards

    syn = cfg.data.synthetic
    folder = Path(cfg.run.output_dir).resolve() / "synthetic_shards"
    print(
        f"[wsss_ray] no data.train_shards given: using {syn.num_images} synthetic images "
        f"in {folder}",
        flush=True,
    )
    return ensure_synthetic_shards(
        folder, syn.num_images, syn.seed, syn.image_size, syn.samples_per_shard
    )


def build_datasets(
    cfg: TrainJobConfig, shards: list[str], source: Any = None, skip_counter: str | None = None
) -> dict:
    if cfg.task == "vpl_seg":
        from wsss_ray.config import pseudo_label_dir
        from wsss_ray.data.seg_train import pseudo_label_dataset

        d = cfg.data
        train = pseudo_label_dataset(
            source,
            pseudo_label_dir(cfg),
            d.crop_size,
            tuple(d.scale_range),
            d.hflip,
            list(d.mean),
            d.decode_batch_size,
            tuple(d.decode_actors),
            d.cpus_per_decode_actor,
            skip_counter,
        )
        return {"train": train}
    if cfg.task in ("clip", "pgseg"):
        from wsss_ray.data.webdataset import image_text_dataset
        from wsss_ray.tasks import tokenizer_spec

        d = cfg.data
        name, context_length = tokenizer_spec(cfg)
        train = image_text_dataset(
            shards,
            name,
            d.image_size,
            tuple(d.crop_scale),
            d.hflip,
            d.decode_batch_size,
            tuple(d.decode_actors),
            d.cpus_per_decode_actor,
            context_length,
            skip_counter,
            decode_device=d.decode_device,
            reader=d.reader,
            passes=d.passes_per_execution,
            multi_label=getattr(getattr(cfg, "loss", None), "multi_label", 0),
            noun_tagger=getattr(getattr(cfg, "loss", None), "noun_tagger", "nltk"),
        )
        return {"train": train}
    raise ValueError(f"no dataset builder for task '{cfg.task}'")


@dataclass
class TrainSetup:
    """What ``prepare`` resolved before Ray starts: folders, data, tracking store."""

    out: Path
    storage: str
    shards: list[str]
    source: Any
    task_args: dict
    config_file: Path
    uri: str


def prepare(cfg: TrainJobConfig) -> TrainSetup:
    """Checks, data (synthetic shards / pseudo-label checks) and the resolved config on disk;
    no Ray yet."""
    from wsss_ray.tasks import check_config

    check_config(cfg)
    out = Path(cfg.run.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    storage = cfg.run.storage_path or str(out / "ray_results")
    shards = train_shards(cfg)
    source, task_args = None, {}
    if cfg.task == "vpl_seg":
        from wsss_ray.config import pseudo_label_dir
        from wsss_ray.data.seg_train import missing_pseudo_labels
        from wsss_ray.eval.datasets import resolve_source

        source = resolve_source(cfg.data.seg, out)
        task_args = {"num_classes": len(source.class_names)}
        labels = pseudo_label_dir(cfg)
        missing = missing_pseudo_labels(source, labels)
        if missing:  # before Ray starts: a clear error, not a failed actor later
            raise FileNotFoundError(
                f"{len(missing)} of {len(source.records)} {source.name} {source.split} images "
                f"have no pseudo-label in {labels} (e.g. {missing[0]}.png); run "
                "jobs/vpl_pseudo_labels.py on this split first"
            )
        print(
            f"[wsss_ray] {len(source.records)} {source.name} {source.split} images with "
            f"pseudo-labels from {labels}",
            flush=True,
        )
    config_file = save_resolved(cfg, out / cfg.run.name)
    uri = tracking_uri(cfg.tracking.uri, str(out))
    return TrainSetup(out, storage, shards, source, task_args, config_file, uri)


def build_trainer(
    cfg: TrainJobConfig, setup: TrainSetup, run_id: str | None, callbacks: list | None = None
) -> Any:
    """The ``TorchTrainer`` of ``cfg`` (Ray must be up); ``run_id`` is the MLflow run rank 0
    logs to; ``callbacks`` go to Train's ``RunConfig`` (e.g. Tune's ``TuneReportCallback``)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from wsss_ray.data.skips import start_skip_counter
    from wsss_ray.eval.periodic import load_validation_set
    from wsss_ray.train.loop import train_loop_per_worker

    skip_counter = start_skip_counter()
    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker, **s.resources_per_worker}
    if s.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg,
            "tracking_uri": setup.uri,
            "run_id": run_id,
            "storage": os.path.join(setup.storage, cfg.run.name),
            "val": load_validation_set(cfg, setup.out),
            "task_args": setup.task_args,
            "skip_counter": skip_counter,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=setup.storage,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.run.num_checkpoints_to_keep
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            callbacks=list(callbacks or []),
        ),
        datasets=build_datasets(cfg, setup.shards, setup.source, skip_counter),
    )


def open_tracker(cfg: TrainJobConfig, setup: TrainSetup, resume: bool = True) -> Tracker:
    """The run's MLflow run (reused when ``resume`` and the name exists in storage), or a
    tracker that records nothing when ``tracking.enabled`` is false."""
    if not cfg.tracking.enabled:
        return Tracker(setup.uri, None)
    return Tracker.open_run(
        setup.uri,
        cfg.tracking.experiment,
        cfg.run.name,
        setup.storage,
        to_flat_dict(cfg),
        str(setup.config_file),
        local_artifact_location(setup.uri, str(setup.out)),
        resume=resume,
    )


def run(cfg: TrainJobConfig) -> RunSummary:
    """Fit the task named by ``cfg.task``; resumes when the run name exists in storage."""
    setup = prepare(cfg)
    init_ray(cfg)
    tracker = open_tracker(cfg, setup)
    trainer = build_trainer(cfg, setup, tracker.run_id)
    try:
        result = trainer.fit()
    except BaseException:
        tracker.finish("FAILED")
        raise
    ckpt = result.checkpoint.path if result.checkpoint else None
    if ckpt:
        tracker.set_tag("checkpoint/final", ckpt)
    metrics = dict(result.metrics or {})
    tracker.finish("FAILED" if metrics.get("stopped_nonfinite") else "FINISHED")
    return RunSummary(metrics, ckpt, setup.uri, tracker.run_id, str(setup.out))


def print_summary(summary: RunSummary) -> None:
    m = summary.metrics
    print(
        "\n[wsss_ray] done: step {} loss {} ({} samples seen, {} skipped)".format(
            m.get("step"),
            f"{m['loss']:.4f}" if "loss" in m else "n/a",
            m.get("samples"),
            m.get("data/skipped"),
        )
    )
    print(f"[wsss_ray] checkpoint: {summary.checkpoint}")
    print(f"[wsss_ray] MLflow store: {summary.tracking_uri} (run {summary.mlflow_run_id})")
    if summary.tracking_uri.startswith("sqlite:///"):
        print(
            f"[wsss_ray] dashboard: mlflow ui --backend-store-uri {summary.tracking_uri}"
            "   (or: make mlflow-ui)"
        )
    if m.get("stopped_nonfinite"):
        print("[wsss_ray] the run stopped early on non-finite losses", flush=True)
