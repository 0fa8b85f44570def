"""Learning-rate schedules as LambdaLR factors of ``lr``: linear warm-up from
``warmup_start_lr`` to ``lr``, then per-step cosine to ``min_lr`` (the PGSeg / GroupViT recipe)
or poly decay to 0 (the WeCLIP / DeepLab recipe used by VPL phase 2).

Two cosines (``optim.schedule``):
- ``cosine``: the cosine runs over the steps *after* the warm-up, so it starts at ``lr``;
- ``timm_cosine``: timm's ``CosineLRScheduler`` as GroupViT and PGSeg build it
  (``t_initial`` = all steps, ``warmup_t`` = warm-up steps, ``warmup_prefix=False``,
  ``cycle_limit=1``, per-step updates): the cosine is a function of the *absolute* step, so
  at the end of the warm-up it drops from ``lr`` to its value there (10 of 30 epochs:
  ``min_lr + 0.75 (lr - min_lr)``), and from ``total_steps`` on it stays at ``min_lr``. The
  reference calls ``step_update(t)`` *after* the optimizer step of iteration t, so iteration k
  trains with the value at ``max(k - 1, 0)``: the first two steps both use ``warmup_start_lr``.
  ``timm_cosine`` reproduces that lag (docs/FIDELITY.md).
"""

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


def timm_cosine(
    lr: float, min_lr: float, warmup_start_lr: float, warmup_steps: int, total_steps: int
) -> Callable[[int], float]:
    """timm's ``CosineLRScheduler(t_initial=total_steps, lr_min=min_lr,
    warmup_lr_init=warmup_start_lr, warmup_t=warmup_steps, warmup_prefix=False,
    cycle_limit=1, t_in_epochs=False)`` as GroupViT/PGSeg step it: the learning rate optimizer
    step ``step`` runs with is the scheduler's value at ``max(step - 1, 0)`` (``step_update``
    follows ``optimizer.step()``), as a factor of ``lr``."""

    def factor(step: int) -> float:
        step = max(step - 1, 0)
        if step < warmup_steps:
            value = warmup_start_lr + (lr - warmup_start_lr) * step / warmup_steps
        elif step < total_steps:
            value = min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * step / total_steps))
        else:
            value = min_lr
        return value / lr

    return factor


def schedule_factor(optim, total_steps: int) -> Callable[[int], float]:
    """The LambdaLR factor ``optim.schedule`` names (cosine | timm_cosine | poly)."""
    o = optim
    if o.schedule == "timm_cosine":
        return timm_cosine(o.lr, o.min_lr, o.warmup_start_lr, o.warmup_steps, total_steps)
    if o.schedule == "poly":
        return warmup_poly(o.lr, o.warmup_start_lr, o.warmup_steps, total_steps, o.poly_power)
    return warmup_cosine(o.lr, o.min_lr, o.warmup_start_lr, o.warmup_steps, total_steps)
