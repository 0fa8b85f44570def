"""Learning-rate schedules as LambdaLR factors of ``lr``: linear warm-up from
``warmup_start_lr`` to ``lr``, then per-step cosine to ``min_lr`` (the PGSeg / GroupViT recipe)
or poly decay to 0 (the WeCLIP / DeepLab recipe used by VPL phase 2)."""

from __future__ import annotations

import math
from collections.abc import Callable


def _with_warmup(
    lr: float, warmup_start_lr: float, warmup_steps: int, total_steps: int, decay
) -> Callable[[int], float]:
    """``decay(t)`` (t in [0, 1] after the warm-up) -> learning rate, as a factor of ``lr``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            value = warmup_start_lr + (lr - warmup_start_lr) * step / warmup_steps
        else:
            span = max(total_steps - warmup_steps, 1)
            value = decay(min((step - warmup_steps) / span, 1.0))
        return value / lr

    return factor


def warmup_cosine(
    lr: float, min_lr: float, warmup_start_lr: float, warmup_steps: int, total_steps: int
) -> Callable[[int], float]:
    return _with_warmup(
        lr,
        warmup_start_lr,
        warmup_steps,
        total_steps,
        lambda t: min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t)),
    )


def warmup_poly(
    lr: float, warmup_start_lr: float, warmup_steps: int, total_steps: int, power: float = 0.9
) -> Callable[[int], float]:
    """Linear warm-up, then ``lr (1 - t)^power`` to 0."""
    return _with_warmup(
        lr, warmup_start_lr, warmup_steps, total_steps, lambda t: lr * (1.0 - t) ** power
    )


def schedule_factor(optim, total_steps: int) -> Callable[[int], float]:
    """The LambdaLR factor ``optim.schedule`` names (cosine | poly)."""
    o = optim
    if o.schedule == "poly":
        return warmup_poly(o.lr, o.warmup_start_lr, o.warmup_steps, total_steps, o.poly_power)
    return warmup_cosine(o.lr, o.min_lr, o.warmup_start_lr, o.warmup_steps, total_steps)
