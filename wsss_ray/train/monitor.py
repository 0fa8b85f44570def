"""What the training loop watches between steps, apart from the step itself.

- :func:`_all_reduce`: floats summed (or the minimum) over the workers, for the decisions every
  rank must take alike (skip a non-finite step) and the report's averages;
- :func:`average_norm_stats`: BatchNorm running statistics averaged over the workers before a
  validation or a checkpoint (gloo has no SyncBatchNorm);
- :class:`NonFiniteGuard` and :class:`StallGuard`: a run that produces NaNs, or whose loss or
  gradient norm stops moving, says so instead of reporting success;
- :class:`_Window`: the sums of one report window, kept on the device and read back once.

Split from :mod:`wsss_ray.train.loop` to keep that module about the loop itself.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
import torch.distributed as dist


def _all_reduce(values: list[float], op: str = "sum") -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.SUM)
    return t.tolist()


def average_norm_stats(module: torch.nn.Module) -> int:
    """Average every BatchNorm's running mean and variance over the workers; returns how many
    buffers. Without SyncBatchNorm (CPU workers: gloo has none) each worker's statistics follow
    its own batches, so the workers would hold different models in eval mode: validation on
    worker 1 would not be the model the checkpoint (worker 0's buffers) holds. Called before
    every validation and checkpoint; training-mode forwards never read these buffers."""
    bufs = [
        b
        for m in module.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        for b in (m.running_mean, m.running_var)
        if b is not None
    ]
    if not bufs or not dist.is_initialized() or dist.get_world_size() == 1:
        return 0
    flat = torch.cat([b.detach().reshape(-1).double() for b in bufs])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for b in bufs:
        n = b.numel()
        b.copy_(flat[offset : offset + n].view_as(b).to(b.dtype))
        offset += n
    return len(bufs)


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


class StallGuard:
    """Divergence that is not a NaN: over the reports, a loss that no longer moves (relative
    change under ``rtol``), or a gradient norm that collapsed (< ``lo``) or exploded (> ``hi``).
    ``update`` returns a warning the first time ``reports`` reports in a row are stalled;
    ``stalled`` is true while the latest ``reports`` all were (the run never recovered)."""

    def __init__(self, reports: int, rtol: float = 1e-6, lo: float = 1e-8, hi: float = 1e6) -> None:
        self.reports, self.rtol, self.lo, self.hi = reports, rtol, lo, hi
        self.run, self.prev, self.warned = 0, None, False

    def _why(self, loss: float, grad_norm: float | None) -> str:
        if grad_norm is not None and grad_norm == grad_norm:
            if grad_norm < self.lo:
                return f"gradient norm {grad_norm:.2e} (collapsed)"
            if grad_norm > self.hi:
                return f"gradient norm {grad_norm:.2e} (exploded)"
        prev, self.prev = self.prev, loss
        if prev is not None and abs(loss - prev) <= self.rtol * max(abs(loss), 1.0):
            return f"loss unchanged at {loss:.4f}"
        return ""

    def update(self, loss: float, grad_norm: float | None = None) -> str:
        if self.reports <= 0:
            return ""
        why = self._why(loss, grad_norm)
        self.run = self.run + 1 if why else 0
        if why and self.run >= self.reports and not self.warned:
            self.warned = True
            return (
                f"warning: {why} for {self.run} reports in a row: the run has diverged or "
                "stalled (lower optim.lr?)"
            )
        if not why:
            self.warned = False
        return ""

    @property
    def stalled(self) -> bool:
        return self.reports > 0 and self.run >= self.reports


class _Window:
    """Sums over the steps since the last report (loss terms, metrics, timing). Tensor values
    are summed on their device (detached, float64: the same sums as adding their ``float()``s)
    and read back once, in :meth:`totals`; plain floats are summed on the host."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.device_sums: dict[str, torch.Tensor] = {}
        self.skipped: torch.Tensor | int = 0
        self.steps = 0
        self.samples = 0
        self.data_wait = 0.0
        self.start = time.perf_counter()

    def _add(self, key: str, value: torch.Tensor | float) -> None:
        if isinstance(value, torch.Tensor):
            v = value.detach().reshape(()).to(torch.float64)
            prev = self.device_sums.get(key)
            self.device_sums[key] = v if prev is None else prev + v
        else:
            self.sums[key] += float(value)

    def add(
        self,
        losses: dict[str, torch.Tensor],
        metrics: dict[str, torch.Tensor | float],
        total: torch.Tensor | float,
    ) -> None:
        for k, v in losses.items():
            self._add(k, v)
        for k, v in metrics.items():
            self._add(k, v)
        self._add("loss", total)
        self.steps += 1

    def add_skipped(self, skipped: torch.Tensor) -> None:
        """The decoders' per-batch drop counts (summed on their device, read at report time)."""
        self.skipped = self.skipped + skipped.detach().sum()

    def totals(self) -> tuple[dict[str, float], int]:
        """(every sum as a float, skipped rows): one device-to-host copy for all of them."""
        out = dict(self.sums)
        keys = list(self.device_sums)
        tensors = [self.device_sums[k] for k in keys]
        skipped_t = isinstance(self.skipped, torch.Tensor)
        if skipped_t:
            tensors.append(self.skipped.to(torch.float64).reshape(()))
        if tensors:
            devices = {t.device for t in tensors}
            if len(devices) > 1:
                tensors = [t.cpu() for t in tensors]
            values = torch.stack(tensors).tolist()
            for k, v in zip(keys, values):
                out[k] = out.get(k, 0.0) + v
        skipped = int(round(values[-1])) if skipped_t else int(self.skipped)
        return out, skipped
