"""The DeepSpeed config dict built from our typed config (never a hand-written JSON)."""

from __future__ import annotations

from typing import Any

from wsss_ray.config import TrainJobConfig


def use_bf16(cfg: TrainJobConfig) -> bool:
    if cfg.train.precision == "auto":
        return cfg.scaling.use_gpu
    return cfg.train.precision == "bf16"


def deepspeed_config(cfg: TrainJobConfig) -> dict[str, Any]:
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.batch_size_per_worker,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": use_bf16(cfg)},
        "zero_allow_untested_optimizer": True,  # we pass torch AdamW (FusedAdam needs CUDA ops)
        "steps_per_print": 10**9,  # we report ourselves
        "wall_clock_breakdown": False,
    }


def total_steps(cfg: TrainJobConfig) -> int:
    """Training length in optimizer steps, from ``max_steps`` or ``max_samples``."""
    t = cfg.train
    if t.max_steps > 0:
        return t.max_steps
    global_batch = t.batch_size_per_worker * t.grad_accum * cfg.scaling.num_workers
    return -(-t.max_samples // global_batch)
