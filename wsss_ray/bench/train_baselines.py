"""The baselines of ``jobs/benchmark.py train``, in one process without Ray: a plain torch loop
(AdamW, clipping and the scheduler step as ours does) and the same model under DeepSpeed as our
loop builds it, both timed by phase, with a FLOP counter for MFU."""

from __future__ import annotations

import os
import time
from collections import defaultdict
from typing import TYPE_CHECKING

import torch

#: train.* options ``--ab`` can flip; the CUDA-only ones are skipped (with a note) on CPU

if TYPE_CHECKING:
    from wsss_ray.bench.train import TrainBenchConfig


def flop_counter():
    """``FlopCounterMode`` that also counts CPU attention (``F.scaled_dot_product_attention``
    on CPU runs ``_scaled_dot_product_flash_attention_for_cpu``, which torch does not count)."""
    from torch.utils.flop_counter import (
        FlopCounterMode,
        sdpa_backward_flop_count,
        sdpa_flop_count,
    )

    def fwd(q, k, v, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(q, k, v)

    def bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out, q, k, v)

    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = fwd
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = bwd
    return FlopCounterMode(display=False, custom_mapping=mapping)


class PlainLoop:
    """The same task stepping on one in-memory batch: forward, backward, AdamW."""

    def __init__(self, cfg, bench: TrainBenchConfig):
        from wsss_ray.bench.npr import synthetic_batch
        from wsss_ray.tasks import build_task

        self.cuda = bool(bench.use_gpu) and torch.cuda.is_available()
        self.device = torch.device("cuda" if self.cuda else "cpu")
        torch.manual_seed(cfg.train.seed)
        self.task = build_task(cfg).to(self.device).train()
        o = cfg.optim
        self.opt = torch.optim.AdamW(
            self.task.param_groups(o.weight_decay),
            lr=o.lr,
            betas=tuple(o.betas),
            eps=o.eps,
            **({"fused": True} if self.cuda else {"foreach": True}),  # as build_engine
        )
        from wsss_ray.train.deepspeed_config import total_steps
        from wsss_ray.train.schedule import schedule_factor

        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, schedule_factor(o, total_steps(cfg))
        )
        self.grad_clip = o.grad_clip
        self.batch = synthetic_batch(self.task, bench.batch, self.device, torch.float32)
        self.bf16 = bench.precision == "bf16"
        self.threads = bench.cpus_per_worker
        self.bench = bench

    def _autocast(self):
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        from contextlib import nullcontext

        return nullcontext()

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def step(self) -> tuple[float, float, float]:
        t0 = time.perf_counter()
        with self._autocast():
            losses, _ = self.task.training_forward(self.batch)
            total = sum(v for k, v in losses.items() if k.endswith("_loss"))
        self._sync()
        t1 = time.perf_counter()
        total.backward()
        self._sync()
        t2 = time.perf_counter()
        if self.grad_clip > 0:  # what DeepSpeed's gradient_clipping does in our engine
            torch.nn.utils.clip_grad_norm_(self.task.parameters(), self.grad_clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.task.after_step()
        self._sync()
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    def flops_per_sample(self) -> float:
        """Forward + backward FLOPs of one batch, per sample (FlopCounterMode)."""
        counter = flop_counter()
        with counter:  # one block: entering the mode again would reset its counts
            with self._autocast():
                losses, _ = self.task.training_forward(self.batch)
                total = sum(v for k, v in losses.items() if k.endswith("_loss"))
            total.backward()
        self.opt.zero_grad(set_to_none=True)
        return counter.get_total_flops() / self.bench.batch

    def run(self) -> dict:
        threads = torch.get_num_threads()
        if not self.cuda:
            torch.set_num_threads(self.threads)
        try:
            for _ in range(self.bench.warmup_steps):
                self.step()
            parts: dict[str, list[float]] = defaultdict(list)
            t0 = time.perf_counter()
            for _ in range(self.bench.steps):
                f, b, o = self.step()
                parts["forward"].append(f)
                parts["backward"].append(b)
                parts["optimizer"].append(o)
            wall = time.perf_counter() - t0
        finally:
            torch.set_num_threads(threads)
        if self.cuda:  # leave the GPU's memory to the Ray Train workers between runs
            torch.cuda.empty_cache()
        n = self.bench.steps
        mean = {k: sum(v) / n for k, v in parts.items()}
        mean["other"] = wall / n - sum(mean.values())  # loop overhead, freeing the graph
        mean["step"] = wall / n
        return {
            "steps": n,
            "wall_s": wall,
            "samples": n * self.bench.batch,
            "samples_per_s": n * self.bench.batch / max(wall, 1e-9),
            "mean_s": mean,
        }


class DeepSpeedLoop(PlainLoop):
    """The plain loop's in-memory batch through the same DeepSpeed engine as the trainer (this
    process, world size 1, :func:`wsss_ray.train.loop.build_engine`): separates DeepSpeed's cost
    from Ray Train's and Ray Data's. ``options``: ``train.*`` fast-path options to turn on
    (e.g. ``{"grad_checkpointing": True}``) for an A/B against the loop without them."""

    def __init__(self, cfg, bench: TrainBenchConfig, options: dict | None = None):
        import copy

        cfg = copy.deepcopy(cfg)
        for key, value in (options or {}).items():
            setattr(cfg.train, key, value)
        super().__init__(cfg, bench)
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if self.cuda else "cpu")
        import torch.distributed as dist

        from wsss_ray.train.deepspeed_config import use_bf16
        from wsss_ray.train.loop import build_engine

        if not dist.is_initialized():
            import socket

            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            dist.init_process_group(
                "nccl" if self.cuda else "gloo",
                init_method=f"tcp://127.0.0.1:{port}",
                rank=0,
                world_size=1,
            )
        torch.manual_seed(cfg.train.seed)
        from wsss_ray.tasks import build_task

        task = build_task(cfg)
        had = os.environ.get("LOCAL_RANK")
        os.environ["LOCAL_RANK"] = "0"  # DeepSpeed asks for it; only for this call
        try:
            self.engine, _, _ = build_engine(cfg, task, world=1)
        finally:
            if had is None:
                os.environ.pop("LOCAL_RANK", None)
        dtype = torch.bfloat16 if use_bf16(cfg) else torch.float32
        self.batch = {
            k: v.to(dtype) if k == "image" else v for k, v in self.batch.items()
        }  # DeepSpeed bf16 casts the module; the loop casts the images

    def step(self) -> tuple[float, float, float]:
        t0 = time.perf_counter()
        losses, _ = self.engine(self.batch)
        total = sum(v for k, v in losses.items() if k.endswith("_loss"))
        self._sync()
        t1 = time.perf_counter()
        self.engine.backward(total)
        self._sync()
        t2 = time.perf_counter()
        self.engine.step()
        self.engine.module.after_step()
        self._sync()
        return t1 - t0, t2 - t1, time.perf_counter() - t2


# ---------------------------------------------------------------------------------- run
