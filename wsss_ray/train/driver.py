"""The Ray Train driver: typed config in, a finished (or resumed) training run out.

``run(cfg)`` prepares data (synthetic shards when none are given), writes the resolved config,
starts or joins Ray (embedded local cluster by default; ``RAY_ADDRESS`` / ``ray job submit``
joins a cluster unchanged), opens the MLflow run and fits a ``TorchTrainer``. The same
``storage_path`` + ``run.name`` resumes from the last checkpoint, in Ray and in MLflow.
``prepare`` + ``build_trainer`` are its two halves, reused by the Tune sweeps (``wsss_ray.tune``),
whose per-trial driver adds its own MLflow child run and ``TuneReportCallback``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsss_ray.config import TrainJobConfig, save_resolved, to_flat_dict
from wsss_ray.runtime import start_ray, wait_for_resources
from wsss_ray.tracking import (
    Tracker,
    check_server,
    local_artifact_location,
    run_queue_dir,
    tracking_uri,
)


@dataclass
class RunSummary:
    metrics: dict[str, Any]
    checkpoint: str | None
    tracking_uri: str
    mlflow_run_id: str | None
    output_dir: str
    error: BaseException | None = None


def worker_bundle(cfg: TrainJobConfig) -> dict[str, float]:
    """The Ray resources of one train worker."""
    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker, **s.resources_per_worker}
    if s.use_gpu:
        resources["GPU"] = 1
    return resources


def init_ray(cfg: TrainJobConfig) -> None:
    """Join ``RAY_ADDRESS`` when set, else an embedded local Ray with enough logical CPUs for
    the train workers plus the decode actors; then fail fast (``ConfigError``) when the cluster
    cannot hold the workers, instead of Ray Train retrying the worker group forever."""
    d, s = cfg.data, cfg.scaling
    needed = s.num_workers * s.cpus_per_worker + d.decode_actors[1] * d.cpus_per_decode_actor + 1
    start_ray(needed, cfg.ray.num_cpus)
    wait_for_resources(
        worker_bundle(cfg),
        s.num_workers,
        d.decode_actors[0] * d.cpus_per_decode_actor,
        s.startup_timeout_s,
    )


def build_datasets(
    cfg: TrainJobConfig,
    shards: list[str],
    source: Any = None,
    skip_counter: str | None = None,
    data_plan: str | None = None,
) -> dict:
    """The task's Ray Datasets (its registry ``datasets`` hook); ``data_plan``: the run's
    :mod:`wsss_ray.data.position` actor, for the tasks whose reader records sample ids."""
    from wsss_ray.tasks.registry import TrainData, spec_for

    data = TrainData(shards, source, data_plan=data_plan)
    return spec_for(cfg).hook("datasets")(cfg, data, skip_counter)


#: the resolved shard list of a run, one path a line, in the run folder and in MLflow
SHARDS_FILE = "shards.txt"


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
    from wsss_ray.tasks.registry import spec_for

    spec = spec_for(cfg)
    spec.hook("check")(cfg)
    out = Path(cfg.run.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    storage = cfg.run.storage_path or str(out / "ray_results")
    data = spec.hook("prepare")(cfg, out)  # shards, a segmentation split, the task's arguments
    shards, source, task_args = data.shards, data.source, data.task_args
    config_file = save_resolved(cfg, out / cfg.run.name)
    if shards:  # the resolved list beside the config (which keeps the source as given)
        (out / cfg.run.name / SHARDS_FILE).write_text("\n".join(shards) + "\n")
    uri = tracking_uri(cfg.tracking.uri, str(out))
    return TrainSetup(out, storage, shards, source, task_args, config_file, uri)


def build_trainer(
    cfg: TrainJobConfig, setup: TrainSetup, run_id: str | None, callbacks: list | None = None
) -> Any:
    """The ``TorchTrainer`` of ``cfg`` (Ray must be up); ``run_id`` is the MLflow run rank 0
    logs to; ``callbacks`` go to Train's ``RunConfig`` (e.g. Tune's ``TuneReportCallback``)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from wsss_ray.data.position import start_data_plan
    from wsss_ray.data.skips import start_skip_counter
    from wsss_ray.eval.periodic import load_validation_set
    from wsss_ray.tasks.registry import spec_for
    from wsss_ray.train.loop import train_loop_per_worker

    skip_counter = start_skip_counter()
    d = cfg.data
    exact = getattr(d, "exact_resume", False) and getattr(d, "reader", "") == "fused"
    data_plan = start_data_plan() if exact else None
    s = cfg.scaling
    resources = worker_bundle(cfg)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg,
            "tracking_uri": setup.uri,
            "run_id": run_id,
            "tracking_queue": tracking_queue(cfg, setup),
            "storage": os.path.join(setup.storage, cfg.run.name),
            "val": load_validation_set(cfg, setup.out),
            "task_args": setup.task_args,
            "task_spec": spec_for(cfg),  # a run-time registered task reaches the workers too
            "skip_counter": skip_counter,
            "data_plan": data_plan,
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
        datasets=build_datasets(cfg, setup.shards, setup.source, skip_counter, data_plan),
    )


def tracking_queue(cfg: TrainJobConfig, setup: TrainSetup) -> str:
    """Where the driver and rank 0 queue MLflow records while the server is unreachable."""
    return run_queue_dir(os.path.join(setup.storage, cfg.run.name), str(setup.out / cfg.run.name))


def open_tracker(cfg: TrainJobConfig, setup: TrainSetup, resume: bool = True) -> Tracker:
    """The run's MLflow run (reused when ``resume`` and the name exists in storage), or a
    tracker that records nothing when ``tracking.enabled`` is false."""
    if not cfg.tracking.enabled:
        return Tracker(setup.uri, None)
    tracker = Tracker.open_run(
        setup.uri,
        cfg.tracking.experiment,
        cfg.run.name,
        setup.storage,
        to_flat_dict(cfg),
        str(setup.config_file),
        local_artifact_location(setup.uri, str(setup.out)),
        resume=resume,
        queue_dir=tracking_queue(cfg, setup),
    )
    shards_file = setup.config_file.parent / SHARDS_FILE
    if setup.shards and shards_file.is_file():
        tracker.log_artifact(str(shards_file))
    return tracker


def finished_run(cfg: TrainJobConfig) -> RunSummary | None:
    """The summary of this run when its storage already holds a checkpoint at the last step
    (read from Ray Train's snapshot: no Ray, no data, no DeepSpeed), else None. Local storage
    only; a cloud ``run.storage_path`` always goes through Ray Train."""
    from wsss_ray.train.deepspeed_config import total_steps

    out = Path(cfg.run.output_dir).resolve()
    storage = cfg.run.storage_path or str(out / "ray_results")
    if "://" in storage:
        return None
    run_storage = os.path.join(storage, cfg.run.name)
    ckpt = last_checkpoint(run_storage)
    if not ckpt or not os.path.isdir(ckpt):
        return None
    metrics = _latest_result(run_storage).get("metrics") or {}
    if int(metrics.get("step", -1)) < total_steps(cfg):
        return None
    uri = tracking_uri(cfg.tracking.uri, str(out))
    return RunSummary(metrics, ckpt, uri, None, str(out))


def run(cfg: TrainJobConfig) -> RunSummary:
    """Fit the task named by ``cfg.task``; resumes when the run name exists in storage, and
    returns at once when that run is already finished (:func:`finished_run`)."""
    done = finished_run(cfg)
    if done is not None:
        print(
            f"[wsss_ray] run '{cfg.run.name}' is already finished (step {done.metrics['step']}): "
            "nothing to train. Give another run.name, or more train.max_steps to go on.",
            flush=True,
        )
        return done
    setup = prepare(cfg)
    if cfg.tracking.enabled:  # a server that is down ends the job before Ray starts
        check_server(setup.uri)
    init_ray(cfg)
    tracker = open_tracker(cfg, setup)
    trainer = build_trainer(cfg, setup, tracker.run_id)
    try:
        with stop_on_signals(os.path.join(setup.storage, cfg.run.name), tracker):
            result = trainer.fit()
    except BaseException:
        tracker.finish("FAILED")
        raise
    ckpt = result.checkpoint.path if result.checkpoint else None
    if ckpt:
        tracker.set_tag("checkpoint/final", ckpt)
    metrics = dict(result.metrics or {})
    failed = metrics.get("stopped_nonfinite") or metrics.get("diverged")
    if ckpt and tracker.run_id and cfg.tracking.log_model and not failed:
        if tracker.online():
            log_final_model(cfg, setup, tracker.run_id, ckpt)
        else:  # MLflow's fluent API would retry for minutes, then fail anyway
            print(f"[wsss_ray] MLflow unreachable: the final model was not logged ({ckpt})")
    tracker.finish("FAILED" if failed else "FINISHED")
    return RunSummary(metrics, ckpt, setup.uri, tracker.run_id, str(setup.out))


def _latest_result(run_storage: str) -> dict:
    """The newest checkpoint result Ray Train registered for a run in local storage (its
    ``checkpoint_manager_snapshot.json``): ``checkpoint_dir_name`` and ``metrics``; {} if none."""
    import json

    snapshot = os.path.join(run_storage, "checkpoint_manager_snapshot.json")
    try:
        with open(snapshot) as f:
            return json.load(f).get("latest_checkpoint_result") or {}
    except (OSError, ValueError):
        return {}


def last_checkpoint(run_storage: str) -> str | None:
    """The newest checkpoint Ray Train has registered (what a rerun resumes from); a checkpoint
    folder written but not yet registered when the job stopped is not one."""
    name = _latest_result(run_storage).get("checkpoint_dir_name")
    return os.path.join(run_storage, name) if name else None


@contextlib.contextmanager
def stop_on_signals(run_storage: str, tracker: Tracker, grace_s: float = 10.0):
    """While training: SIGINT (Ctrl-C) and SIGTERM stop the job within seconds. Ray Train's own
    handler only asks the controller to abort, which waits on a worker group that may never
    start, and exits 1 without a word. Here (Ray Train's handler is not installed) the handler
    names the last checkpoint, marks the MLflow run KILLED, shuts Ray down (the embedded
    cluster's processes with it; on a cluster the controller and workers die with their owner)
    and exits 130 / 143; a rerun of the same command resumes from that checkpoint. A watchdog
    exits anyway after ``grace_s``."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):  # noqa: ARG001
        name = signal.Signals(signum).name
        code = 128 + signum
        threading.Timer(grace_s, lambda: os._exit(code)).start()
        ckpt = last_checkpoint(run_storage)
        print(
            f"\n[wsss_ray] {name}: stopping. Last checkpoint: {ckpt or 'none yet'}; "
            "run the same command again to resume from it.",
            file=sys.stderr,
            flush=True,
        )
        try:
            tracker.finish("KILLED")
        except Exception:  # noqa: BLE001 - the tracking server may be the reason we stop
            pass
        try:
            import ray

            ray.shutdown()
        finally:
            os._exit(code)

    # Ray Train's fit() would replace our SIGINT handler with its own, whose graceful abort
    # blocks on a controller that may be stuck starting workers (and exits 1 without a word)
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    ray_handler = DataParallelTrainer.__dict__.get("_register_sigint_handler")
    DataParallelTrainer._register_sigint_handler = lambda self, controller: None
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if ray_handler is not None:
            DataParallelTrainer._register_sigint_handler = ray_handler


def log_final_model(cfg: TrainJobConfig, setup: TrainSetup, run_id: str, ckpt: str) -> None:
    """The run's final model as an MLflow model (the task's ``package`` hook; registered as
    ``tracking.register_as`` when set). A failure here is printed, never fatal: the run and its
    checkpoints are complete without it."""
    from wsss_ray.tasks.registry import spec_for

    spec = spec_for(cfg)
    if not spec.has("package") or not os.path.exists(ckpt):
        return
    try:
        import mlflow

        from wsss_ray.console import library_output
        from wsss_ray.tracking import using_tracking_uri

        with library_output():  # DeepSpeed's merge and MLflow's warnings: console.log
            from wsss_ray.inference.mlflow_model import log_segmenter

            seg = spec.hook("package")(ckpt, str(setup.config_file))
            with using_tracking_uri(setup.uri), mlflow.start_run(run_id=run_id):
                info = log_segmenter(seg, "model", cfg.tracking.register_as or None)
        name = cfg.tracking.register_as
        print(
            f"[wsss_ray] MLflow model: {info.model_uri}"
            + (f" (registered as models:/{name})" if name else ""),
            flush=True,
        )
    except Exception as err:  # noqa: BLE001 - the run itself is done and saved
        print(f"[wsss_ray] the MLflow model was not logged: {err}", flush=True)


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
    if m.get("diverged"):
        print(
            "[wsss_ray] the run diverged or stalled and never recovered (see the warnings above):"
            " its model is not to be trusted",
            flush=True,
        )


def train_job(cfg: TrainJobConfig) -> tuple[int, RunSummary | None]:
    """What a training job's ``main`` does with its config: run it and print the summary.
    Returns (exit status: 2 for a driver-side config error, 1 when the run stopped on non-finite
    losses or diverged without recovering, else 0; the summary, None on a config error)."""
    import sys

    from wsss_ray.config import ConfigError
    from wsss_ray.errors import user_errors

    try:
        with user_errors():  # a dataset or checkpoint file that cannot be used: one line, 2
            summary = run(cfg)
    except ConfigError as err:  # checks that need the model registry or the data
        print(str(err), file=sys.stderr)
        return 2, None
    print_summary(summary)
    failed = summary.metrics.get("stopped_nonfinite") or summary.metrics.get("diverged")
    return (1 if failed else 0), summary
