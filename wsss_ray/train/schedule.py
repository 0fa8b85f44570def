"""Learning-rate schedule: linear warm-up from ``warmup_start_lr`` to ``lr``, then per-step
cosine to ``min_lr`` (the PGSeg / GroupViT recipe). Expressed as a LambdaLR factor of ``lr``."""

from __future__ import annotations

import math
from collections.abc import Callable


def warmup_cosine(
    lr: float, min_lr: float, warmup_start_lr: float, warmup_steps: int, total_steps: int
) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            value = warmup_start_lr + (lr - warmup_start_lr) * step / warmup_steps
        else:
            span = max(total_steps - warmup_steps, 1)
            t = min((step - warmup_steps) / span, 1.0)
            value = min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t))
        return value / lr

    return factor


def warmup_poly(
    lr: float, warmup_start_lr: float, warmup_steps: int, total_steps: int, power: float = 0.9
) -> Callable[[int], float]:
    """Linear warm-up, then ``(1 - t)^power`` decay to 0 (the WeCLIP / DeepLab recipe)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            value = warmup_start_lr + (lr - warmup_start_lr) * step / warmup_steps
        else:
            span = max(total_steps - warmup_steps, 1)
            t = min((step - warmup_steps) / span, 1.0)
            value = lr * (1.0 - t) ** power
        return value / lr

    return factor


def schedule_factor(optim, total_steps: int) -> Callable[[int], float]:
    """The LambdaLR factor ``optim.schedule`` names (cosine | poly)."""
    o = optim
    if o.schedule == "poly":
        return warmup_poly(o.lr, o.warmup_start_lr, o.warmup_steps, total_steps, o.poly_power)
    return warmup_cosine(o.lr, o.min_lr, o.warmup_start_lr, o.warmup_steps, total_steps)
