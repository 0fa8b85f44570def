"""The one per-worker training loop every task runs inside Ray Train.

Each worker builds the task, wraps it with ``deepspeed.initialize`` (ZeRO stage, bf16 on GPU,
fp32 on CPU, clipping, torch AdamW, warm-up + cosine), streams its shard of the Ray Dataset and
steps. Every ``log_every`` steps all ranks call ``ray.train.report`` (a barrier: the cadence is a
pure function of the step, identical on every rank); every ``ckpt_every`` steps they also write a
DeepSpeed checkpoint (each rank its ZeRO shard) which Ray merges into one checkpoint directory.
A restart resumes from ``ray.train.get_checkpoint()`` at the saved optimizer step.

Non-finite losses: the decision is all-reduced so every rank skips the same step; ``max_nonfinite``
in a row stops the run cleanly with a message (restarting would only hit the same batch again).

The fast path (docs/PERFORMANCE.md): one host sync per step (the non-finite check; metrics stay
detached device tensors until :class:`_Window` converts them at report time with one
``stack().tolist()``), and the ``train.*`` options applied by :func:`build_engine`: activation
checkpointing, ``torch.compile`` of the encoders, TF32 and fused AdamW on CUDA, ZeRO stage 0 for
one fp32 worker. With ``data.decode_device=cuda`` the batches carry JPEG bytes and ``_prepare``
decodes them on the worker's GPU.

Ray Data cannot resume a streaming read mid-epoch, so with the fused reader
(``data.exact_resume``) each checkpoint records the ids of the samples consumed in the current
execution and a resume passes over exactly those (:mod:`wsss_ray.data.position`), for any number
of workers; other readers restart the interrupted execution's epochs.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch

from wsss_ray.data.gpu_decode import decode_crop_batch, jpeg_collate_fn, normalize_images
from wsss_ray.data.position import load_positions
from wsss_ray.eval.checkpoint import CKPT_TAG
from wsss_ray.tasks import build_task
from wsss_ray.tracking import Tracker
from wsss_ray.train.data_position import DataPosition
from wsss_ray.train.deepspeed_config import deepspeed_config, total_steps, use_bf16, zero_stage
from wsss_ray.train.elastic import load_engine_state, saved_layout
from wsss_ray.train.manifest import verify, write_manifest
from wsss_ray.train.monitor import (
    NonFiniteGuard,
    StallGuard,
    _all_reduce,
    _Window,
    average_norm_stats,
)
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


def _decode_device(cfg: Any) -> str:
    """``data.decode_device`` of image-text tasks; other tasks' data configs decode on CPU."""
    return getattr(cfg.data, "decode_device", "cpu")


def _prepare(
    batch: dict[str, Any], cfg: Any, dtype: torch.dtype, device: torch.device | None = None
) -> dict:
    """The task's batch: images normalised to ``dtype``; with GPU decode (``jpeg`` column), the
    JPEGs decoded, cropped and flipped on ``device`` first, every tensor moved there."""
    out = dict(batch)
    if "jpeg" in out:
        dev = device or torch.device("cpu")
        jpegs, crop, flip = out.pop("jpeg"), out.pop("crop"), out.pop("flip")
        out = {k: v.to(dev, non_blocking=True) for k, v in out.items()}
        out["image"] = decode_crop_batch(jpegs, crop, flip, cfg.data.image_size, dev)
    img = out.get("image")
    if img is not None and img.dtype == torch.uint8:
        out["image"] = normalize_images(img, cfg.data.mean, cfg.data.std, dtype)
    return out


def compile_works(device: str = "cpu") -> str:
    """'' when ``torch.compile`` (inductor) can build a kernel here, else why not (e.g. no C++
    compiler on a CPU host)."""
    try:
        fn = torch.compile(lambda x: torch.sin(x) + 1, dynamic=False)
        fn(torch.ones(4, device=device))
    except Exception as err:  # noqa: BLE001 - any failure means: stay eager
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return ""


def apply_fast_path(task: torch.nn.Module, cfg: Any, log: Any = say) -> dict[str, bool]:
    """The ``train.*`` fast-path options that act on the task before ``deepspeed.initialize``:
    activation checkpointing of the transformer blocks, TF32 (CUDA only) and ``torch.compile``
    of the image and text encoders (in place: checkpoint keys do not change; eager with a
    message when inductor cannot compile here). Returns what was applied."""
    t = cfg.train
    cuda = bool(cfg.scaling.use_gpu) and torch.cuda.is_available()
    model = getattr(task, "model", None)
    encoders = [getattr(model, n, None) for n in ("img_encoder", "text_encoder")]
    encoders = [e for e in encoders if isinstance(e, torch.nn.Module)]
    applied = {"grad_checkpointing": False, "tf32": False, "compile": False}
    if t.grad_checkpointing:
        for enc in encoders:
            if hasattr(type(enc), "grad_checkpointing"):  # GroupViT
                enc.grad_checkpointing = True
            elif hasattr(enc, "set_grad_checkpointing"):  # open_clip's text transformer
                enc.set_grad_checkpointing(True)
            else:
                continue
            applied["grad_checkpointing"] = True
        if not applied["grad_checkpointing"]:
            log(f"[wsss_ray] train.grad_checkpointing: task '{cfg.task}' has no encoder for it")
    if t.tf32 and cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        applied["tf32"] = True
    if t.compile:
        why = compile_works("cuda" if cuda else "cpu")
        if why:
            log(f"[wsss_ray] train.compile: torch.compile does not work here ({why}); eager")
        elif encoders:
            for enc in encoders:
                enc.compile(dynamic=False)
            applied["compile"] = True
    return applied


def build_engine(
    cfg: Any, task: torch.nn.Module, world: int = 1, keep_zero: bool = False
) -> tuple[Any, Any, Any]:
    """``(engine, optimizer, scheduler)``: the fast-path options, torch AdamW (fused on CUDA
    with ``train.fused_adamw``), the warm-up + decay schedule and ``deepspeed.initialize`` with
    :func:`~wsss_ray.train.deepspeed_config.deepspeed_config` for ``world`` workers. Shared by
    the loop and ``wsss_ray.bench.train``; ``torch.distributed`` must be initialised.
    ``keep_zero``: ZeRO even for one worker (resuming a ZeRO checkpoint)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.scaling.use_gpu else "cpu")
    import deepspeed

    apply_fast_path(task, cfg)
    o = cfg.optim
    cuda = bool(cfg.scaling.use_gpu) and torch.cuda.is_available()
    # fused kernels on CUDA; elsewhere the multi-tensor (foreach) path, not a loop per tensor
    fused = {"fused": True} if cuda and cfg.train.fused_adamw else {"foreach": True}
    optimizer = torch.optim.AdamW(
        task.param_groups(o.weight_decay, o.decay_logit_scales),
        lr=o.lr,
        betas=tuple(o.betas),
        eps=o.eps,
        **fused,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_factor(o, total_steps(cfg)))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=task,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world, keep_zero),
        dist_init_required=False,
    )
    if world == 1 and zero_stage(cfg, world, keep_zero) == 0:
        # nothing to average with one worker: skip DeepSpeed's gradient all-reduce (its bucket
        # flattening and copies), which it otherwise runs after every backward
        engine.enable_backward_allreduce = False
    return engine, optimizer, scheduler


def iter_kwargs(cfg: Any) -> dict[str, Any]:
    """``iter_torch_batches`` arguments that depend on the data options (GPU decode: the
    collate that keeps JPEG bytes; GPU workers: pinned host memory, deeper prefetch)."""
    out: dict[str, Any] = {}
    if _decode_device(cfg) == "cuda":
        out["collate_fn"] = jpeg_collate_fn()
    if cfg.scaling.use_gpu:
        out.update(prefetch_batches=4, pin_memory=True)
    return out


def _older_checkpoints(checkpoint: Any) -> list[Any]:
    """The run's other ``checkpoint_step_*`` folders beside ``checkpoint``, newest first (the
    ``run.num_checkpoints_to_keep`` Ray Train keeps), on the same filesystem."""
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    parent, own = os.path.split(checkpoint.path.rstrip("/"))
    infos = checkpoint.filesystem.get_file_info(pafs.FileSelector(parent))
    names = sorted(
        (i.base_name for i in infos if i.type == pafs.FileType.Directory),
        reverse=True,
    )
    return [
        Checkpoint(os.path.join(parent, n), filesystem=checkpoint.filesystem)
        for n in names
        if n.startswith("checkpoint_step_") and n < own
    ]


def load_verified(engine: Any, checkpoint: Any, rank: int = 0) -> tuple[Any, dict, Any]:
    """Load the newest checkpoint whose manifest verifies (:mod:`wsss_ray.train.manifest`):
    ``checkpoint`` first, then the older ones of the run, with a warning naming the bad file.
    Every rank verifies what it reads (each its own ZeRO shard); they agree on the choice
    through one all-reduce per candidate. Raises when none is intact. Returns (the checkpoint
    loaded, DeepSpeed's client state, the data position every old rank recorded or None)."""
    problems = []
    for cand in [checkpoint, *_older_checkpoints(checkpoint)]:
        with cand.as_directory() as ckpt_dir:
            why = verify(ckpt_dir)
            ok = _all_reduce([0.0 if why else 1.0], "min")[0] > 0
            if ok:
                client = load_engine_state(engine, ckpt_dir, CKPT_TAG, say)
                if cand is not checkpoint and rank == 0:
                    say(
                        f"[wsss_ray] warning: checkpoint {checkpoint.path} is damaged "
                        f"({problems[0]}); resumed from {cand.path} instead"
                    )
                return cand, client, load_positions(ckpt_dir)
        problems.append(why or "another worker's files are damaged")
    raise RuntimeError(
        f"no intact checkpoint to resume from: {checkpoint.path}: {problems[0]}; delete the "
        "run's storage folder to start over"
    )


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = loop_config["cfg"]
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.scaling.use_gpu else "cpu")
    import ray.train
    from ray.train import Checkpoint

    _quiet_train_reports()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.train.seed)  # identical init on every rank
    spec = loop_config.get("task_spec")  # the driver's registry entry (None: the table's)
    task = build_task(cfg, spec, **loop_config.get("task_args", {}))
    synced_bn = cfg.scaling.use_gpu and world > 1
    if synced_bn:  # batch statistics over the global batch (NCCL only)
        task = task.sync_batchnorm()
    torch.manual_seed(cfg.train.seed + 1009 * rank)  # independent noise per rank

    steps = total_steps(cfg)
    if _decode_device(cfg) == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("data.decode_device=cuda: this train worker has no CUDA device")
    layout = saved_layout(ray.train.get_checkpoint())  # ZeRO partitions to re-partition?
    engine, optimizer, scheduler = build_engine(cfg, task, world, bool(layout and layout.zero))
    dtype = torch.bfloat16 if use_bf16(cfg) else torch.float32

    state = {"samples": 0, "skipped": 0, "nonfinite": 0, "epoch": 0}
    checkpoint, position = ray.train.get_checkpoint(), None
    if checkpoint is not None:
        checkpoint, client, position = load_verified(engine, checkpoint, rank)
        state.update({k: client[k] for k in state})
    start_step = engine.global_steps
    is_main = rank == 0
    data = DataPosition(loop_config.get("data_plan"), cfg, loop_config["storage"], rank, world)
    note = data.resume(position, state["epoch"])
    if note and is_main:
        say(f"[wsss_ray] {note}")
    tracker = Tracker(
        loop_config["tracking_uri"],
        loop_config["run_id"] if is_main else None,
        queue_dir=loop_config.get("tracking_queue"),
    )
    if is_main:
        where = f"resuming at step {start_step}" if checkpoint else "starting at step 0"
        say(f"[wsss_ray] {cfg.task}: {world} workers, {steps} steps, {where}")
        tracker.log_metrics({"resumed_from_step": start_step}, start_step)

    validate, every_eval = None, 0
    if loop_config.get("val"):
        from wsss_ray.eval.periodic import build_validator

        validate = build_validator(cfg, loop_config["val"], spec)
        every_eval = cfg.eval.every

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
    shown = [0]  # named skips printed so far
    if counter and is_main:
        from wsss_ray.data.skips import read_skip_names, read_skips

        skipped_offset = read_skips(counter)  # skips of an earlier worker group of this driver
        shown[0] = len(read_skip_names(counter))
    shard = ray.train.get_dataset_shard("train")
    B = cfg.train.batch_size_per_worker
    window = _Window()
    guard, stop_reason = NonFiniteGuard(cfg.train.max_nonfinite, state["nonfinite"]), ""
    stall = StallGuard(cfg.train.stall_reports)
    last_ckpt = start_step

    def report(step: int, with_checkpoint: bool, evaluate: bool = False) -> None:
        nonlocal window, last_ckpt
        totals, skipped_local = window.totals()  # the window's one device-to-host copy
        keys = sorted(totals)
        sums = _all_reduce([totals[k] for k in keys] + [skipped_local])
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
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        warning = stall.update(metrics.get("loss", float("nan")), metrics.get("grad_norm"))
        if warning and is_main:
            say(f"[wsss_ray] {warning}")
        if stall.stalled and step >= steps:
            metrics["diverged"] = 1  # never recovered: the job exits non-zero
        if world > 1 and not synced_bn and (evaluate or with_checkpoint):
            average_norm_stats(engine.module)  # one model on every worker, and in the checkpoint
        if evaluate:
            metrics.update(validation_metrics())
        if not with_checkpoint:
            ray.train.report(metrics)
        else:
            tmp = tempfile.mkdtemp(prefix="wsss_ckpt_")
            client = {k: state[k] for k in ("samples", "skipped", "nonfinite", "epoch")}
            engine.save_checkpoint(tmp, tag=CKPT_TAG, client_state=client)
            data.save(tmp, state["epoch"])  # the samples consumed so far in this execution
            write_manifest(tmp, rank)  # this rank's files (ZeRO shards); checked on resume
            name = f"checkpoint_step_{step:08d}"
            ray.train.report(
                metrics, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=name
            )
            shutil.rmtree(tmp, ignore_errors=True)
            last_ckpt = step
            if is_main:
                tracker.set_tag("checkpoint/latest", os.path.join(loop_config["storage"], name))
        data.record(step)
        if is_main:
            tracker.log_metrics(metrics, step)
            terms = " ".join(f"{k} {metrics[k]:.4f}" for k in keys if k.endswith("_loss"))
            say(
                f"[wsss_ray] step {step}/{steps} loss {metrics.get('loss', float('nan')):.4f} "
                f"({terms}) lr {metrics['lr']:.2e} {metrics['samples_per_s']:.1f} samples/s "
                f"skipped {state['skipped']}" + (" [checkpoint]" if with_checkpoint else "")
            )
            if counter:  # which samples the decoders dropped: shard, key, why (the first 100)
                for line in read_skip_names(counter, shown[0]):
                    say(f"[wsss_ray]   skipped {line}")
                    shown[0] += 1
        window = _Window()

    step = start_step
    warned_decode = False
    while step < steps and not stop_reason:
        got_batch = False
        resumed = data.begin_execution()  # the data plan, set before any rank starts it
        t_wait = time.perf_counter()
        for batch in shard.iter_torch_batches(
            batch_size=B,
            drop_last=True,
            local_shuffle_buffer_size=cfg.data.local_shuffle_buffer or None,
            **iter_kwargs(cfg),
        ):
            got_batch = True
            window.data_wait += time.perf_counter() - t_wait
            if "skipped" in batch:
                window.add_skipped(batch.pop("skipped"))
            data.add(batch.pop("sample_id", None), state["epoch"])
            if _decode_device(cfg) == "cuda" and "jpeg" not in batch and not warned_decode:
                warned_decode = True
                say("[wsss_ray] data.decode_device=cuda but the dataset decodes on CPU actors")
            losses, metrics = engine(_prepare(batch, cfg, dtype, engine.device))
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
            window.add(losses, metrics, total)  # detached device tensors: no sync
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
        if not got_batch and not resumed:  # a resumed execution may have had < a batch left
            raise RuntimeError(
                f"the training data yields no full batch of {B} per worker; "
                "use more data, fewer workers or a smaller train.batch_size_per_worker"
            )
        if step < steps and not stop_reason:  # one execution = data.passes_per_execution epochs
            state["epoch"] += getattr(cfg.data, "passes_per_execution", 1)
            data.end_execution()
    if step > last_ckpt:
        report(step, with_checkpoint=True, evaluate=bool(validate))
