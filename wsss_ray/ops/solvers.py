"""First-order solvers for the convex prototype objective of VPL phase 1
(:func:`wsss_ray.ops.prototypes.solve_vision_prototypes`): limited-memory BFGS with Armijo
backtracking, and Nesterov's accelerated gradient with a monotone safeguard. Each takes a
closure returning (value, gradient) and keeps its state between steps; both only ever accept a
step that lowers the objective. No Ray."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

_Evaluate = Callable[[torch.Tensor], tuple[float, torch.Tensor]]


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() * b.double()).sum())


class _LBFGS:
    """Limited-memory BFGS direction + Armijo backtracking. The direction -H g is a descent
    direction because H stays positive definite (pairs with s.y <= 0 are skipped); if rounding
    ever makes g.d >= 0, or backtracking fails, the memory is dropped and a gradient step is
    taken instead. Every accepted step satisfies J_new <= J + c1 t g.d < J. The first step (no
    memory) is the gradient step of size 1/L with L the Lipschitz bound of the solver."""

    c1 = 1e-4

    def __init__(self, evaluate: _Evaluate, safe_step: float, history: int) -> None:
        self.evaluate, self.safe_step, self.history = evaluate, safe_step, history
        self.S: list[torch.Tensor] = []
        self.Y: list[torch.Tensor] = []
        self.restarts = 0

    def _direction(self, g: torch.Tensor) -> torch.Tensor:
        if not self.S:
            return -self.safe_step * g
        q = g.clone()
        alphas = []
        for s, y in zip(reversed(self.S), reversed(self.Y)):
            rho = 1.0 / _dot(y, s)
            alpha = rho * _dot(s, q)
            q -= alpha * y
            alphas.append((rho, alpha))
        q *= _dot(self.S[-1], self.Y[-1]) / _dot(self.Y[-1], self.Y[-1])
        for (s, y), (rho, alpha) in zip(zip(self.S, self.Y), reversed(alphas)):
            q += (alpha - rho * _dot(y, q)) * s
        return -q

    def step(self, x, fx, gx):
        while True:
            d = self._direction(gx)
            gd = _dot(gx, d)
            if not gd < 0.0 and self.S:
                self._reset()
                continue
            # with memory, t may need to shrink a lot; the plain step safe_step * g passes Armijo
            # at t = 1 in exact arithmetic (descent lemma), so failing a few halvings of it means
            # rounding noise: stop rather than spend dozens of passes over F
            t, t_min = 1.0, (1e-6 if self.S else 1.0 / 32)
            while t >= t_min:
                z = x + t * d
                fz, gz = self.evaluate(z)
                if math.isfinite(fz) and fz <= fx + self.c1 * t * gd and fz < fx:
                    break
                t *= 0.5
            else:
                if self.S:  # retry once from a plain gradient direction
                    self._reset()
                    continue
                return None
            s, y = z - x, gz - gx
            sy = _dot(s, y)
            if sy > 1e-12 * math.sqrt(_dot(s, s) * _dot(y, y)):
                self.S.append(s)
                self.Y.append(y)
                if len(self.S) > self.history:
                    self.S.pop(0)
                    self.Y.pop(0)
            return z, fz, gz, t

    def _reset(self) -> None:
        self.S.clear()
        self.Y.clear()
        self.restarts += 1


class _AGD:
    """Nesterov-accelerated gradient descent, adaptive step found by Armijo backtracking
    (J(z) <= J(y) - s/2 ||g(y)||^2), with a monotone safeguard: if the extrapolated step does not
    end below the current iterate, the momentum is dropped and a plain gradient step is taken
    from the iterate (function-value restart), which always decreases J."""

    c = 0.5
    grow_after = 5  # try doubling the step after this many steps without backtracking

    def __init__(self, evaluate: _Evaluate, safe_step: float) -> None:
        self.evaluate = evaluate
        self.step_size = safe_step
        self.min_step = safe_step / 32  # safe_step passes Armijo exactly (descent lemma)
        self.x_prev: torch.Tensor | None = None
        self.theta = 1.0
        self.clean = 0
        self.restarts = 0

    def _search(self, y, fy, gy):
        gy_sq = _dot(gy, gy)
        s = self.step_size * 2.0 if self.clean >= self.grow_after else self.step_size
        backtracked = False
        while s >= self.min_step:
            z = y - s * gy
            fz, gz = self.evaluate(z)
            if math.isfinite(fz) and fz <= fy - self.c * s * gy_sq:
                self.clean = 0 if backtracked else self.clean + 1
                self.step_size = s
                return z, fz, gz, s
            s *= 0.5
            backtracked = True
        return None

    def step(self, x, fx, gx):
        theta_next = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * self.theta**2))
        beta = (self.theta - 1.0) / theta_next
        result = None
        if self.x_prev is not None and beta > 0.0:
            y = x + beta * (x - self.x_prev)
            fy, gy = self.evaluate(y)
            result = self._search(y, fy, gy) if math.isfinite(fy) else None
            if result is None or not result[1] < fx:
                self.restarts += 1
                result = None
                theta_next = 1.0  # momentum restarts from scratch
        if result is None:
            result = self._search(x, fx, gx)
            if result is None or not result[1] < fx:
                return None
        self.x_prev, self.theta = x, theta_next
        return result
