"""Per-sample Hungarian matching of group tokens to prototypes on cosine similarity
(METHODS.md 1.4). The similarity matrices are computed for the whole batch in one matmul;
``scipy.optimize.linear_sum_assignment`` then runs once per sample on the CPU, never a Python
loop over tokens.

Large matchings (K >= ``THREAD_MIN_K``, e.g. PGSeg's 64 x 64 stage 1) are split into one
contiguous slice of the batch per thread (scipy releases the GIL while it solves); small ones
(K = 8) stay on the calling thread, where a thread hand-off would cost more than the solve.
:func:`hungarian_match_async` takes the matching off the critical path on a GPU: the
similarities are copied to pinned host memory without blocking, a background thread waits for
the copy and solves while the caller keeps queueing GPU work, and ``result()`` returns the
permutation on the device (copied without blocking). On CPU tensors it solves at once and equals
:func:`hungarian_match`, which stays synchronous (the copy to the host waits for the device).
``wsss_ray.tasks.pgseg`` starts its matchings this way as soon as their inputs exist.

``maximize=True`` pairs each group with its most similar prototype. The reference code forgot
``maximize=True`` and so pairs the *least* similar ones; ``maximize=False`` reproduces it.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

#: matchings with at least this many groups are split across threads
THREAD_MIN_K = 32
_POOLS: dict[int, ThreadPoolExecutor] = {}
_DISPATCH: ThreadPoolExecutor | None = None


def _pool(threads: int) -> ThreadPoolExecutor:
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="hungarian")
    return _POOLS[threads]


def _solve_block(sims: np.ndarray, maximize: bool) -> np.ndarray:
    out = np.empty(sims.shape[:2], np.int64)
    for b, m in enumerate(sims):
        rows, cols = linear_sum_assignment(m, maximize=maximize)
        out[b, rows] = cols
    return out


def _solve(sims: np.ndarray, maximize: bool, threads: int) -> np.ndarray:
    """B x K perms of B x K x K similarities; one slice of the batch per thread when large."""
    b, k = sims.shape[:2]
    if threads <= 1 or k < THREAD_MIN_K or b < 2 * threads:
        return _solve_block(sims, maximize)
    bounds = np.linspace(0, b, threads + 1).astype(int)
    futures = [
        _pool(threads).submit(_solve_block, sims[lo:hi], maximize)
        for lo, hi in zip(bounds[:-1], bounds[1:])
    ]
    return np.concatenate([f.result() for f in futures])


def _similarity(groups_BKC: torch.Tensor, protos_BKC: torch.Tensor) -> torch.Tensor:
    """B x K x K cosine similarities in fp32, also under ``torch.autocast`` (which would make
    the product bf16: numpy cannot take it, and the matching should not see bf16 ties)."""
    with torch.autocast(groups_BKC.device.type, enabled=False):
        g = F.normalize(groups_BKC.float(), dim=-1)
        return g @ F.normalize(protos_BKC.float(), dim=-1).transpose(1, 2)


class PendingMatch:
    """A matching in flight; ``result()`` is the B x K long permutation on the input's device."""

    def __init__(self, future: Future, device: torch.device):
        self._future, self._device = future, device

    def result(self) -> torch.Tensor:
        perm = torch.from_numpy(self._future.result())
        if self._device.type == "cpu":
            return perm
        return perm.pin_memory().to(self._device, non_blocking=True)


@torch.no_grad()
def hungarian_match_async(
    groups_BKC: torch.Tensor, protos_BKC: torch.Tensor, maximize: bool = True, threads: int = 4
) -> PendingMatch:
    """Start the matching without waiting for the device (see the module docstring)."""
    global _DISPATCH
    sim = _similarity(groups_BKC, protos_BKC)
    if sim.is_cuda:
        host = torch.empty(sim.shape, dtype=sim.dtype, pin_memory=True)
        host.copy_(sim, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()

        def job() -> np.ndarray:
            ready.synchronize()
            return _solve(host.numpy(), maximize, threads)

        _DISPATCH = _DISPATCH or ThreadPoolExecutor(1, thread_name_prefix="hungarian-dispatch")
        return PendingMatch(_DISPATCH.submit(job), groups_BKC.device)
    done: Future = Future()
    done.set_result(_solve(sim.cpu().numpy(), maximize, threads))
    return PendingMatch(done, groups_BKC.device)


@torch.no_grad()
def hungarian_match(
    groups_BKC: torch.Tensor, protos_BKC: torch.Tensor, maximize: bool = True, threads: int = 4
) -> torch.Tensor:
    """Returns perm (B x K, long): prototype ``perm[b, i]`` is matched to group ``i``."""
    sim = _similarity(groups_BKC, protos_BKC).cpu().numpy()  # waits for the device
    return torch.from_numpy(_solve(sim, maximize, threads)).to(groups_BKC.device)


def gather_matched(protos_BKC: torch.Tensor, perm_BK: torch.Tensor) -> torch.Tensor:
    """Reorder prototypes so row i is the one matched to group i."""
    idx = perm_BK.unsqueeze(-1).expand(-1, -1, protos_BKC.shape[-1])
    return torch.gather(protos_BKC, 1, idx)
