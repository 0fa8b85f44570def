"""One fp32 worker: DeepSpeed runs ZeRO stage 0 without its gradient all-reduce, and AdamW takes
the multi-tensor (foreach) path; the step equals plain torch (AdamW + clipping + the schedule)
computed independently in the test."""

from __future__ import annotations

import torch

from tests._dist import spawn_gloo
from wsss_ray.config import ClipPretrainConfig, load_config


class _Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(8, 16)
        self.b = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x))).pow(2).mean()

    def param_groups(self, weight_decay: float, decay_scales: bool = False) -> list[dict]:
        decay = [p for p in self.parameters() if p.ndim > 1]
        rest = [p for p in self.parameters() if p.ndim <= 1]
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": rest, "weight_decay": 0},
        ]


_OVERRIDES = [
    "scaling.num_workers=1",
    "optim.grad_clip=0.01",  # small: clipping acts
    "optim.warmup_steps=0",
    "train.max_steps=3",
]


def _engine_steps(rank: int, out) -> None:
    import os

    from wsss_ray.train.loop import build_engine

    os.environ.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1")  # what Ray Train sets

    cfg = load_config(ClipPretrainConfig, "configs/clip/tiny.yaml", _OVERRIDES)
    engine, optimizer, _ = build_engine(cfg, _Toy(), world=1)
    out["allreduce"] = engine.enable_backward_allreduce
    out["foreach"] = [g.get("foreach") for g in optimizer.param_groups]
    torch.manual_seed(1)
    for _ in range(3):
        loss = engine(torch.randn(4, 8))
        engine.backward(loss)
        engine.step()
    out["state"] = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def test_one_worker_skips_the_all_reduce_and_equals_plain_torch():
    got = spawn_gloo(_engine_steps, world=1)
    assert got["allreduce"] is False
    assert all(f is True for f in got["foreach"]), got["foreach"]

    from wsss_ray.train.schedule import schedule_factor

    cfg = load_config(ClipPretrainConfig, "configs/clip/tiny.yaml", _OVERRIDES)
    o = cfg.optim
    toy = _Toy()
    opt = torch.optim.AdamW(
        toy.param_groups(o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps, foreach=False
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule_factor(o, 3))
    torch.manual_seed(1)
    for _ in range(3):
        opt.zero_grad()
        toy(torch.randn(4, 8)).backward()
        torch.nn.utils.clip_grad_norm_(toy.parameters(), o.grad_clip)
        opt.step()
        sched.step()
    for k, v in toy.state_dict().items():
        torch.testing.assert_close(got["state"][k], v, atol=1e-6, rtol=1e-5)
