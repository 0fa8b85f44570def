"""What every evaluation job built on Ray Data batch inference shares: the rows its actors
return (summed confusion matrices plus a few overlays), the driver's streaming loop that sums
them with progress lines, and the MLflow run for the outputs it writes.

Actors return one row per batch carrying the batch's summed confusion matrices and image count,
plus one extra row per additional overlay (Ray Data rows must have equal shapes, and overlays
are few), so the driver never holds per-image predictions.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


def pack_rows(
    conf: np.ndarray, images: int, overlay_ids: list[str], overlay_pngs: list[bytes]
) -> dict[str, np.ndarray]:
    """An actor's output for one batch: ``conf`` (any shape) and the image count in the first
    row, one overlay per row (at least one row)."""
    n = max(1, len(overlay_ids))
    confs = np.zeros((n, *conf.shape), np.int64)
    confs[0] = conf
    counts = np.zeros(n, np.int64)
    counts[0] = images
    return {
        "confusion": confs,
        "images": counts,
        "overlay_id": np.array((overlay_ids + [""] * n)[:n], dtype=object),
        "overlay": np.array((overlay_pngs + [b""] * n)[:n], dtype=object),
    }


@dataclass
class EvalRun:
    """What an evaluation job opens before Ray starts: its output folders, the resolved config
    it saved, the split to score and the ids whose overlays it keeps."""

    out: Path
    folder: Path
    config_file: Path
    source: Any  # SegSource
    overlay_ids: list[str]


def open_eval(cfg: Any) -> EvalRun:
    """Create ``<output_dir>/<run.name>``, save the resolved config there, resolve ``cfg.data``
    (ValueError when the split is empty) and pick ``cfg.num_overlays`` evenly spaced ids."""
    from wsss_ray.config import save_resolved
    from wsss_ray.eval.datasets import resolve_source

    out = Path(cfg.run.output_dir).resolve()
    folder = out / cfg.run.name
    folder.mkdir(parents=True, exist_ok=True)
    config_file = save_resolved(cfg, folder)
    source = resolve_source(cfg.data, out)
    if not source.records:
        raise ValueError(f"{cfg.data.kind} split '{cfg.data.split}' has no images")
    step = max(1, len(source.records) // max(cfg.num_overlays, 1))
    overlay_ids = [r.id for r in source.records[::step][: cfg.num_overlays]]
    return EvalRun(out, folder, config_file, source, overlay_ids)


def predicted(source: Any, predictor: type, args: tuple, inf: Any, ray_cpus: int) -> Any:
    """Start Ray (``ray_cpus`` logical CPUs when embedded, 0 = the machine's) and stream the
    split through an actor pool of ``predictor(*args)`` sized by ``inf`` (an InferConfig)."""
    from wsss_ray.data.segmentation import segmentation_dataset

    return on_actor_pool(lambda: segmentation_dataset(source), predictor, args, inf, ray_cpus)


def on_actor_pool(
    dataset: Callable[[], Any],
    actor: type,
    args: tuple,
    inf: Any,
    ray_cpus: int = 0,
    kwargs: dict[str, Any] | None = None,
) -> Any:
    """Start Ray (``ray_cpus`` logical CPUs when embedded, 0 = the machine's), then map
    ``dataset()`` (built once Ray is up) through an actor pool of ``actor(*args, **kwargs)``
    sized by ``inf``: anything with ``actors`` (min, max), ``cpus_per_actor``,
    ``gpus_per_actor`` (< 0: one when the cluster has GPUs) and ``batch_size``, an InferConfig
    or ``jobs/segment.py``'s arguments."""
    import ray

    from wsss_ray.runtime import cluster_has_gpus, start_ray

    start_ray(inf.actors[1] * inf.cpus_per_actor + 1, ray_cpus)
    gpus = inf.gpus_per_actor if inf.gpus_per_actor >= 0 else float(cluster_has_gpus())
    return dataset().map_batches(
        actor,
        fn_constructor_args=args,
        fn_constructor_kwargs=kwargs,
        batch_size=inf.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=inf.actors[0], max_size=inf.actors[1]),
        num_cpus=inf.cpus_per_actor,
        num_gpus=gpus,
        batch_format="numpy",
    )


def progress(label: str, done: int, total: int, t0: float, next_at: float) -> float:
    """Print ``done/total images (rate)`` when another 10% is done (or all); returns the next
    fraction to print at."""
    if done / max(total, 1) >= next_at or done == total:
        rate = done / max(time.perf_counter() - t0, 1e-9)
        print(f"[wsss_ray] {label} {done}/{total} images ({rate:.1f} images/s)", flush=True)
        return done / max(total, 1) + 0.1
    return next_at


def collect(ds: Any, num_images: int, shape: tuple[int, ...], label: str = "eval"):
    """Stream ``ds`` (rows of :func:`pack_rows`), summing the matrices, printing progress every
    10%. Returns (summed confusion, images done, {id: overlay PNG}, seconds)."""
    total = np.zeros(shape, np.int64)
    done, t0, next_print = 0, time.perf_counter(), 0.1
    overlays: dict[str, bytes] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        total += batch["confusion"].sum(0)
        done += int(batch["images"].sum())
        for key, png in zip(batch["overlay_id"], batch["overlay"]):
            if key:
                overlays[str(key)] = bytes(png)
        next_print = progress(label, done, num_images, t0, next_print)
    return total, done, overlays, time.perf_counter() - t0


def write_overlays(folder: Path, overlays: dict[str, bytes], name: str = "overlays") -> Path:
    path = Path(folder) / name
    path.mkdir(parents=True, exist_ok=True)
    for key, png in overlays.items():
        (path / f"{key}.png").write_bytes(png)
    return path


def log_eval_outputs(cfg: Any, run: EvalRun, metrics: dict[str, float]) -> str:
    """The MLflow run of an evaluation job: metrics, ``miou.txt``, ``results.json`` and the
    ``overlays/`` folder it wrote. Returns the run id."""
    from wsss_ray.tracking import log_job_run

    folder = run.folder
    return log_job_run(
        cfg,
        str(run.out),
        str(folder),
        cfg.run.name,
        str(run.config_file),
        metrics,
        [str(folder / "miou.txt"), str(folder / "results.json")],
        {str(folder / "overlays"): "overlays"},
    )


def finish_eval(
    cfg: Any,
    run: EvalRun,
    result: Any,
    baselines: dict[str, float],
    done: int,
    elapsed: float,
    overlays: dict[str, bytes],
    line: str,
) -> dict[str, Any]:
    """The end every evaluation job shares: metrics (the result's, ``baseline/<name>_miou``,
    images and images/s), ``miou.txt``, ``results.json``, the overlays, the table and ``line``
    printed, and the MLflow run (its id and the output folder added to the metrics).
    ``baselines``: name -> mIoU as the fraction ``IoUResult.miou``; every mIoU, IoU and pixel
    accuracy written or logged is in percent (``wsss_ray.eval.miou``)."""
    import json

    from wsss_ray.eval.miou import percent

    folder = run.folder
    metrics = result.metrics()
    for name, value in baselines.items():
        metrics[f"baseline/{name}_miou"] = percent(value)
    metrics["images"] = done
    metrics["images_per_s"] = done / max(elapsed, 1e-9)
    table = result.table()
    (folder / "miou.txt").write_text(table + "\n")
    (folder / "results.json").write_text(json.dumps(metrics, indent=2))
    write_overlays(folder, overlays)
    print(table)
    print(line, flush=True)
    if cfg.tracking.enabled:
        metrics["mlflow_run_id"] = log_eval_outputs(cfg, run, metrics)
    metrics["output"] = str(folder)
    return metrics
