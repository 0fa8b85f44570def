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
