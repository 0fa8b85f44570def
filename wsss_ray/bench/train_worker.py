"""What each Ray Train worker runs in ``jobs/benchmark.py train``: our training loop's step,
timed by phase (data, forward, backward, optimizer, bookkeeping, report) with the collectives
timed apart (``CommTimer``), on the real data pipeline or a fixed in-memory batch."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import defaultdict

import torch

#: train.* options ``--ab`` can flip; the CUDA-only ones are skipped (with a note) on CPU
PHASES = ("data", "forward", "backward", "optimizer", "bookkeeping", "report")
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "reduce",
    "barrier",
    "all_to_all_single",
)


class CommTimer:
    """Wraps ``torch.distributed`` collectives to sum the seconds spent inside them (install
    before DeepSpeed captures the functions)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def install(self) -> None:
        import torch.distributed as dist

        for name in COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is None or getattr(fn, "_bench_wrapped", False):
                continue

            def wrapped(*args, __fn=fn, **kwargs):
                t0 = time.perf_counter()
                try:
                    return __fn(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - t0
                    self.calls += 1

            wrapped._bench_wrapped = True  # type: ignore[attr-defined]
            setattr(dist, name, wrapped)

    def take(self) -> tuple[float, int]:
        out = (self.seconds, self.calls)
        self.seconds, self.calls = 0.0, 0
        return out


# --------------------------------------------------------------------------------- ours
def bench_loop_per_worker(loop_config: dict) -> None:
    """``wsss_ray.train.loop.train_loop_per_worker``'s hot path with a timer per phase (no
    checkpoints, no validation, no MLflow); rank 0 reports the summary."""
    cfg = loop_config["cfg"]
    warmup = loop_config["warmup_steps"]
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.scaling.use_gpu else "cpu")
    comm = CommTimer()
    comm.install()
    import ray.train

    from wsss_ray.tasks import build_task
    from wsss_ray.train.deepspeed_config import total_steps, use_bf16
    from wsss_ray.train.loop import _prepare, build_engine, iter_kwargs
    from wsss_ray.train.monitor import _all_reduce, _Window

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.train.seed)
    task = build_task(cfg)
    if cfg.scaling.use_gpu and world > 1:
        task = task.sync_batchnorm()
    steps = total_steps(cfg)
    engine, _, _ = build_engine(cfg, task, world)
    dtype = torch.bfloat16 if use_bf16(cfg) else torch.float32
    cuda = cfg.scaling.use_gpu and torch.cuda.is_available()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    B = cfg.train.batch_size_per_worker
    synthetic = loop_config.get("synthetic", False)
    shard = None if synthetic else ray.train.get_dataset_shard("train")
    times: dict[str, list[float]] = defaultdict(list)
    window = _Window()
    step, t_start, epochs = 0, None, 0
    comm.take()
    while step < steps:
        epochs += 1
        if synthetic:  # the same uint8 batch forever: Ray Train without Ray Data
            batches = iter(lambda: _uint8_batch(cfg, B), None)
        else:
            batches = iter(
                shard.iter_torch_batches(batch_size=B, drop_last=True, **iter_kwargs(cfg))
            )
        while step < steps:
            t0 = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            batch.pop("skipped", None)
            sync()
            t1 = time.perf_counter()
            losses, metrics = engine(_prepare(batch, cfg, dtype, engine.device))
            total = sum(v for k, v in losses.items() if k.endswith("_loss"))
            sync()
            t2 = time.perf_counter()
            finite = _all_reduce([float(torch.isfinite(total.detach()).all())], "min")[0] > 0
            t3 = time.perf_counter()
            engine.backward(total)
            sync()
            t4 = time.perf_counter()
            engine.step()
            engine.module.after_step()
            sync()
            t5 = time.perf_counter()
            window.add(losses, metrics, total)
            step += 1
            t6 = time.perf_counter()
            if step % cfg.train.log_every == 0:
                totals, skipped = window.totals()
                _all_reduce([totals[k] for k in sorted(totals)] + [skipped])
                ray.train.report({"step": step})
                window = _Window()
            t7 = time.perf_counter()
            comm_s, comm_calls = comm.take()
            if step == warmup:
                t_start = t7
            if step > warmup:
                for name, dt in zip(
                    PHASES, (t1 - t0, t2 - t1, t4 - t3, t5 - t4, (t3 - t2) + (t6 - t5), t7 - t6)
                ):
                    times[name].append(dt)
                times["step"].append(t7 - t0)
                times["comm"].append(comm_s)
                times["comm_calls"].append(comm_calls)
            if not finite:
                raise RuntimeError("non-finite loss in the benchmark")
    wall = time.perf_counter() - (t_start or time.perf_counter())
    measured = max(step - warmup, 0)
    summary = {
        "rank": rank,
        "world": world,
        "torch_threads": torch.get_num_threads(),
        "steps": measured,
        "epochs": epochs,
        "wall_s": wall,
        "samples": measured * B * world,
        "samples_per_s": measured * B * world / max(wall, 1e-9),
        "mean_s": {k: sum(v) / max(len(v), 1) for k, v in times.items()},
        "median_s": {k: sorted(v)[len(v) // 2] if v else 0.0 for k, v in times.items()},
    }
    # Train V2 keeps the metrics of checkpointed reports: attach a one-file checkpoint
    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        with open(os.path.join(tmp, "bench.json"), "w") as f:
            json.dump(summary, f)
        checkpoint = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
        ray.train.report({"step": step, "bench": json.dumps(summary)}, checkpoint=checkpoint)


_BATCH: dict = {}


def _uint8_batch(cfg, batch: int) -> dict[str, torch.Tensor]:
    """What the decode actors deliver (uint8 B x H x W x 3 images, token ids), made once."""
    if "b" not in _BATCH:
        from wsss_ray.bench.npr import CAPTIONS
        from wsss_ray.models.clip import tokenizer
        from wsss_ray.tasks import tokenizer_spec

        name, ctx = tokenizer_spec(cfg)
        size = cfg.data.image_size
        g = torch.Generator().manual_seed(0)
        device = "cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu"
        _BATCH["b"] = {
            "image": torch.randint(0, 256, (batch, size, size, 3), generator=g, dtype=torch.uint8),
            "text": tokenizer(name, ctx)([CAPTIONS[i % len(CAPTIONS)] for i in range(batch)]),
        }
        _BATCH["b"] = {k: v.to(device) for k, v in _BATCH["b"].items()}
    return dict(_BATCH["b"])
