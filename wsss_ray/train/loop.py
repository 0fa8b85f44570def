"""The one per-worker training loop every task runs inside Ray Train.

Each worker builds the task, wraps it with ``deepspeed.initialize`` (ZeRO stage, bf16 on GPU,
fp32 on CPU, clipping, torch AdamW, warm-up + cosine), streams its shard of the Ray Dataset and
steps. Every ``log_every`` steps all ranks call ``ray.train.report`` (a barrier: the cadence is a
pure function of the step, identical on every rank); every ``ckpt_every`` steps they also write a
DeepSpeed checkpoint (each rank its ZeRO shard) which Ray merges into one checkpoint directory.
A restart resumes from ``ray.train.get_checkpoint()`` at the saved optimizer step.

Non-finite losses: the decision is all-reduced so every rank skips the same step; ``max_nonfinite``
in a row stops the run cleanly with a message (restarting would only hit the same batch again).

Ray Data cannot resume a streaming read mid-epoch, so the data position is recorded (samples
seen, epoch) but not replayed; shards are reshuffled on every pass instead.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from wsss_ray.data.webdataset import normalize_images
from wsss_ray.eval.checkpoint import CKPT_TAG
from wsss_ray.tasks import build_task
from wsss_ray.tracking import Tracker
from wsss_ray.train.deepspeed_config import deepspeed_config, total_steps, use_bf16
from wsss_ray.train.schedule import schedule_factor


def say(msg: str) -> None:
    """One progress line. Ray Train V2 patches ``print`` and tees to the wrapped stdout, which
    prints every line twice; the real stdout is streamed to the driver once."""
    print(msg, file=sys.__stdout__, flush=True)


def _quiet_train_reports() -> None:
    """Train V2 logs every ``ray.train.report`` at INFO with the whole metrics dict ("Reporting
    training result ..."), which the driver prints beside our own progress line; keep warnings."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray layout: keep its logging as it is
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def _all_reduce(values: list[float], op: str = "sum") -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.SUM)
    return t.tolist()


class NonFiniteGuard:
    """Counts non-finite losses; after ``limit`` in a row it returns the reason to stop."""

    def __init__(self, limit: int, total: int = 0):
        self.limit, self.total, self.run = limit, total, 0

    def update(self, finite: bool, step: int) -> str:
        if finite:
            self.run = 0
            return ""
        self.run += 1
        self.total += 1
        if self.run >= self.limit:
            return (
                f"{self.run} non-finite losses in a row at step {step}; "
                "stopping (lower the lr or check the data)"
            )
        return ""


class _Window:
    """Sums over the steps since the last report (loss terms, metrics, timing)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.steps = 0
        self.samples = 0
        self.data_wait = 0.0
        self.start = time.perf_counter()

    def add(self, losses: dict[str, torch.Tensor], metrics: dict[str, float], total: float) -> None:
        for k, v in losses.items():
            self.sums[k] += float(v.detach())
        for k, v in metrics.items():
            self.sums[k] += float(v)
        self.sums["loss"] += total
        self.steps += 1


def _prepare(batch: dict[str, torch.Tensor], cfg: Any, dtype: torch.dtype) -> dict:
    out = dict(batch)
    img = out.get("image")
    if img is not None and img.dtype == torch.uint8:
        out["image"] = normalize_images(img, cfg.data.mean, cfg.data.std, dtype)
    return out


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = loop_config["cfg"]
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.scaling.use_gpu else "cpu")
    import deepspeed  # inside the worker: it picks its accelerator at import time
    import ray.train
    from ray.train import Checkpoint

    _quiet_train_reports()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.train.seed)  # identical init on every rank
    task = build_task(cfg, **loop_config.get("task_args", {}))
    if cfg.scaling.use_gpu and world > 1:  # batch statistics over the global batch (NCCL only)
        task = torch.nn.SyncBatchNorm.convert_sync_batchnorm(task)
    torch.manual_seed(cfg.train.seed + 1009 * rank)  # independent noise per rank

    steps = total_steps(cfg)
    o = cfg.optim
    optimizer = torch.optim.AdamW(
        task.param_groups(o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_factor(o, steps))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=task,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg),
        dist_init_required=False,
    )
    dtype = torch.bfloat16 if use_bf16(cfg) else torch.float32

    state = {"samples": 0, "skipped": 0, "nonfinite": 0, "epoch": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            path, client = engine.load_checkpoint(ckpt_dir, tag=CKPT_TAG)
        if path is None:
            raise RuntimeError(f"could not load the DeepSpeed checkpoint in {checkpoint.path}")
        state.update({k: client[k] for k in state})
    start_step = engine.global_steps
    is_main = rank == 0
    tracker = Tracker(loop_config["tracking_uri"], loop_config["run_id"] if is_main else None)
    if is_main:
        where = f"resuming at step {start_step}" if checkpoint else "starting at step 0"
        say(f"[wsss_ray] {cfg.task}: {world} workers, {steps} steps, {where}")
        tracker.log_metrics({"resumed_from_step": start_step}, start_step)

    validate, every_eval = None, 0
    if loop_config.get("val"):
        from wsss_ray.eval.periodic import build_validator

        validate, every_eval = build_validator(cfg, loop_config["val"]), cfg.eval.every

    def validation_metrics() -> dict[str, float]:
        from wsss_ray.eval.miou import iou_from_confusion

        t0 = time.perf_counter()
        conf = validate(engine.module, rank, world)
        total = _all_reduce(conf.reshape(-1).astype(float).tolist())
        names = loop_config["val"]["class_names"]
        result = iou_from_confusion(np.array(total).reshape(conf.shape), names)
        out = result.metrics("val/")
        out["val/seconds"] = time.perf_counter() - t0
        if is_main:
            say(f"[wsss_ray] step {step} validation mIoU {100 * result.miou:.1f}")
        return out

    counter = loop_config.get("skip_counter")
    skipped_base, skipped_offset = state["skipped"], 0
    if counter and is_main:
        from wsss_ray.data.skips import read_skips

        skipped_offset = read_skips(counter)  # skips of an earlier worker group of this driver
    shard = ray.train.get_dataset_shard("train")
    B = cfg.train.batch_size_per_worker
    window = _Window()
    guard, stop_reason = NonFiniteGuard(cfg.train.max_nonfinite, state["nonfinite"]), ""
    last_ckpt = start_step

    def report(step: int, with_checkpoint: bool, evaluate: bool = False) -> None:
        nonlocal window, last_ckpt
        keys = sorted(window.sums)
        sums = _all_reduce([window.sums[k] for k in keys] + [state["skipped_local"]])
        state["skipped_local"] = 0
        if counter and is_main:  # exact: every decoder's skips, whatever rows were dropped
            state["skipped"] = skipped_base + read_skips(counter) - skipped_offset
        elif not counter:
            state["skipped"] += int(sums[-1])
        elapsed = time.perf_counter() - window.start
        n = max(window.steps, 1) * world
        metrics = {k: v / n for k, v in zip(keys, sums)}
        metrics.update(
            {
                "step": step,
                "samples": state["samples"],
                "epoch": state["epoch"],
                "lr": scheduler.get_last_lr()[0],
                "samples_per_s": window.samples * world / max(elapsed, 1e-9),
                "data_wait_frac": window.data_wait / max(elapsed, 1e-9),
                "data/skipped": state["skipped"],
                "nonfinite_skipped": state["nonfinite"],
            }
        )
        if stop_reason:
            metrics["stopped_nonfinite"] = 1
        if evaluate:
            metrics.update(validation_metrics())
        if not with_checkpoint:
            ray.train.report(metrics)
        else:
            tmp = tempfile.mkdtemp(prefix="wsss_ckpt_")
            client = {k: state[k] for k in ("samples", "skipped", "nonfinite", "epoch")}
            engine.save_checkpoint(tmp, tag=CKPT_TAG, client_state=client)
            name = f"checkpoint_step_{step:08d}"
            ray.train.report(
                metrics, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=name
            )
            shutil.rmtree(tmp, ignore_errors=True)
            last_ckpt = step
            if is_main:
                tracker.set_tag("checkpoint/latest", os.path.join(loop_config["storage"], name))
        if is_main:
            tracker.log_metrics(metrics, step)
            terms = " ".join(f"{k} {metrics[k]:.4f}" for k in keys if k.endswith("_loss"))
            say(
                f"[wsss_ray] step {step}/{steps} loss {metrics.get('loss', float('nan')):.4f} "
                f"({terms}) lr {metrics['lr']:.2e} {metrics['samples_per_s']:.1f} samples/s "
                f"skipped {state['skipped']}" + (" [checkpoint]" if with_checkpoint else "")
            )
        window = _Window()

    state["skipped_local"] = 0
    step = start_step
    while step < steps and not stop_reason:
        got_batch = False
        t_wait = time.perf_counter()
        for batch in shard.iter_torch_batches(
            batch_size=B,
            drop_last=True,
            local_shuffle_buffer_size=cfg.data.local_shuffle_buffer or None,
        ):
            got_batch = True
            window.data_wait += time.perf_counter() - t_wait
            if "skipped" in batch:
                state["skipped_local"] += int(batch.pop("skipped").sum())
            losses, metrics = engine(_prepare(batch, cfg, dtype))
            total = sum(v for k, v in losses.items() if k.endswith("_loss"))
            finite = _all_reduce([float(torch.isfinite(total.detach()).all())], "min")[0] > 0
            stop_reason = guard.update(finite, step)
            state["nonfinite"] = guard.total
            if stop_reason:
                if is_main:
                    say(f"[wsss_ray] {stop_reason}")
                break
            if not finite:
                t_wait = time.perf_counter()
                continue
            engine.backward(total)
            engine.step()
            state["samples"] += B * world
            window.samples += B
            window.add(losses, metrics, float(total.detach()))
            if engine.global_steps != step:  # an optimizer step happened (accumulation boundary)
                step = engine.global_steps
                engine.module.after_step()
                ev = bool(validate) and (step % every_eval == 0 or step >= steps)
                if step % cfg.train.ckpt_every == 0 or step >= steps:
                    report(step, with_checkpoint=True, evaluate=ev)
                elif step % cfg.train.log_every == 0 or ev:
                    report(step, with_checkpoint=False, evaluate=ev)
                if step >= steps:
                    break
            t_wait = time.perf_counter()
        if not got_batch:
            raise RuntimeError(
                f"the training data yields no full batch of {B} per worker; "
                "use more data, fewer workers or a smaller train.batch_size_per_worker"
            )
        if step < steps and not stop_reason:
            state["epoch"] += 1
    if step > last_ckpt:
        report(step, with_checkpoint=True, evaluate=bool(validate))
