"""The EMA of every prototype module of a model in one all-reduce (``flush_prototype_updates``,
issue 25): on 2 gloo ranks with different batches, the deferred updates give the same ``mu0``
as each module all-reducing right after its own forward, with 1 all-reduce instead of 3."""

from __future__ import annotations

import torch

from tests._dist import spawn_gloo
from wsss_ray.ops.gmm import EMPrototypes, flush_prototype_updates


def _model() -> torch.nn.ModuleList:
    torch.manual_seed(0)
    return torch.nn.ModuleList(
        [
            EMPrototypes(4, 8, iters=3),
            EMPrototypes(2, 8, iters=3),
            EMPrototypes(4, 1, iters=3, norm="prototype", ema_renorm=False),
        ]
    ).train()


def _inputs(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(10 + rank)  # each rank its own batch
    return [torch.randn(3, 6, 8, generator=g), torch.randn(3, 5, 8, generator=g)] + [
        torch.randn(3, 7, 1, generator=g)
    ]


def _run(rank: int, out) -> None:
    import torch.distributed as dist

    calls = {"n": 0}
    real = dist.all_reduce

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    dist.all_reduce = counting
    try:
        for deferred in (False, True):
            model = _model()
            for m in model:
                m.deferred = deferred
            calls["n"] = 0
            for _ in range(2):  # two steps: the second reads the first's buffers
                for m, x in zip(model, _inputs(rank)):
                    m(x)
                flushed = flush_prototype_updates(model)
            key = "deferred" if deferred else "immediate"
            out[f"{key}{rank}"] = [m.mu0.clone() for m in model]
            out[f"{key}_calls{rank}"] = calls["n"]
            out[f"{key}_flushed{rank}"] = flushed
    finally:
        dist.all_reduce = real


def test_one_all_reduce_for_every_prototype_module_same_buffers():
    got = spawn_gloo(_run, world=2)
    assert got["immediate_calls0"] == 6 and got["deferred_calls0"] == 2  # 3 vs 1 per step
    assert got["immediate_flushed0"] == 0 and got["deferred_flushed0"] == 3
    for rank in (0, 1):
        for a, b in zip(got[f"immediate{rank}"], got[f"deferred{rank}"]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # the ranks saw different batches and still hold the same buffers (the mean of both)
    for a, b in zip(got["deferred0"], got["deferred1"]):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(got["deferred0"][0], _model()[0].mu0)  # the EMA moved
