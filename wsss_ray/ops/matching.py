"""Per-sample Hungarian matching of group tokens to prototypes on cosine similarity
(METHODS.md 1.4). The similarity matrices are computed for the whole batch in one matmul;
``scipy.optimize.linear_sum_assignment`` then runs once per sample on the CPU (in a thread pool
for large batches), never a Python loop over tokens.

``maximize=True`` pairs each group with its most similar prototype. The reference code forgot
``maximize=True`` and so pairs the *least* similar ones; ``maximize=False`` reproduces it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

_POOL: ThreadPoolExecutor | None = None


@torch.no_grad()
def hungarian_match(
    groups_BKC: torch.Tensor, protos_BKC: torch.Tensor, maximize: bool = True, threads: int = 4
) -> torch.Tensor:
    """Returns perm (B x K, long): prototype ``perm[b, i]`` is matched to group ``i``."""
    global _POOL
    sim = F.normalize(groups_BKC.float(), dim=-1) @ F.normalize(
        protos_BKC.float(), dim=-1
    ).transpose(1, 2)
    sim_np = sim.cpu().numpy()

    def solve(m: np.ndarray) -> np.ndarray:
        rows, cols = linear_sum_assignment(m, maximize=maximize)
        out = np.empty_like(cols)
        out[rows] = cols
        return out

    if len(sim_np) >= 64 and threads > 1:
        _POOL = _POOL or ThreadPoolExecutor(max_workers=threads)
        perms = list(_POOL.map(solve, sim_np))
    else:
        perms = [solve(m) for m in sim_np]
    return torch.from_numpy(np.stack(perms)).to(groups_BKC.device)


def gather_matched(protos_BKC: torch.Tensor, perm_BK: torch.Tensor) -> torch.Tensor:
    """Reorder prototypes so row i is the one matched to group i."""
    idx = perm_BK.unsqueeze(-1).expand(-1, -1, protos_BKC.shape[-1])
    return torch.gather(protos_BKC, 1, idx)
