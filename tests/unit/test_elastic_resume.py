"""Elastic resume of the optimizer (wsss_ray.train.elastic): a ZeRO-2 checkpoint written by 2
workers, resumed by 1, continues exactly as the 2 workers would have: the Adam moments and
fp32 weights are re-partitioned, not restarted. Reference: the same 2 workers going on. And
the other way: one worker's checkpoint (a fresh run's stage 0, or ZeRO kept after a shrink)
resumed by 2 workers continues as the one worker would have."""

from __future__ import annotations

import os

import pytest
import torch

from tests._dist import spawn_gloo
from tests.unit.test_single_worker_engine import _Toy  # two groups: decay and no decay
from wsss_ray.config import ClipPretrainConfig, load_config

TAG = "ckpt"
_OVERRIDES = ["optim.grad_clip=1.0", "optim.warmup_steps=0", "train.max_steps=6"]


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 8, generator=g) for _ in range(5)]  # the global batch of each step


def _engine(world: int, keep_zero: bool = False):
    from wsss_ray.train.loop import build_engine

    cfg = load_config(
        ClipPretrainConfig, "configs/clip/tiny.yaml", [*_OVERRIDES, f"scaling.num_workers={world}"]
    )
    return build_engine(cfg, _Toy(), world=world, keep_zero=keep_zero)[0]


def _steps(engine, batches, rank: int, world: int) -> None:
    for x in batches:
        part = x.chunk(world)[rank]  # each worker its share of the global batch
        engine.backward(engine(part))
        engine.step()


def _two_workers(rank: int, out) -> None:
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE="2")
    engine = _engine(2)
    out["stage"] = engine.zero_optimization_stage()
    _steps(engine, _batches()[:3], rank, 2)
    engine.save_checkpoint(out["dir"], tag=TAG, client_state={"samples": 24})
    _steps(engine, _batches()[3:], rank, 2)
    if rank == 0:
        out["after"] = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def _one_worker(rank: int, out) -> None:
    from wsss_ray.train.elastic import load_engine_state

    os.environ.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1")
    engine = _engine(1, keep_zero=True)
    client = load_engine_state(engine, out["dir"], TAG, say=lambda m: out.update(said=m))
    out["samples"], out["step"] = client["samples"], engine.global_steps
    _steps(engine, _batches()[3:], 0, 1)
    out["after"] = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    # the control: the same weights with the Adam moments restarted end elsewhere
    fresh = _engine(1, keep_zero=True)
    fresh.load_checkpoint(out["dir"], tag=TAG, load_optimizer_states=False)
    _steps(fresh, _batches()[3:], 0, 1)
    out["restarted"] = {k: v.detach().clone() for k, v in fresh.module.state_dict().items()}


def test_zero2_checkpoint_of_two_workers_resumes_on_one_exactly(tmp_path, monkeypatch):
    from wsss_ray.train.elastic import _zero_ranks

    monkeypatch.chdir(os.getcwd())
    two = spawn_gloo(_set_dir(_two_workers, tmp_path), world=2)
    assert two["stage"] == 2
    names = [str(p) for p in (tmp_path / TAG).iterdir()]
    assert _zero_ranks(names) == 2
    one = spawn_gloo(_set_dir(_one_worker, tmp_path), world=1)
    assert one["samples"] == 24 and one["step"] == 3
    assert "the ZeRO state of 2 workers, for 1" in one["said"]
    for k, v in two["after"].items():
        torch.testing.assert_close(one["after"][k], v, rtol=1e-5, atol=1e-6)
    gap = max((one["restarted"][k] - v).abs().max().item() for k, v in two["after"].items())
    assert gap > 1e-4, gap  # restarting the moments would be caught


def _one_worker_saves(rank: int, out) -> None:
    os.environ.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1")
    engine = _engine(1, keep_zero=out["keep_zero"])
    out["stage"] = engine.zero_optimization_stage()
    _steps(engine, _batches()[:3], 0, 1)
    engine.save_checkpoint(out["dir"], tag=TAG, client_state={"samples": 24})
    _steps(engine, _batches()[3:], 0, 1)
    out["after"] = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def _two_workers_resume(rank: int, out) -> None:
    from wsss_ray.train.elastic import load_engine_state

    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE="2")
    engine = _engine(2)
    said = []
    client = load_engine_state(engine, out["dir"], TAG, say=said.append)
    step = engine.global_steps
    _steps(engine, _batches()[3:], rank, 2)
    fresh = _engine(2)  # the control: the Adam moments restarted
    fresh.load_checkpoint(out["dir"], tag=TAG, load_optimizer_states=False)
    _steps(fresh, _batches()[3:], rank, 2)
    if rank == 0:
        out["said"], out["samples"], out["step"] = said, client["samples"], step
        out["after"] = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
        out["restarted"] = {k: v.detach().clone() for k, v in fresh.module.state_dict().items()}


@pytest.mark.parametrize("keep_zero", [False, True], ids=["stage0", "zero2"])
def test_one_workers_checkpoint_resumes_on_two_exactly(tmp_path, monkeypatch, keep_zero):
    monkeypatch.chdir(os.getcwd())
    one = spawn_gloo(_set_dir(_one_worker_saves, tmp_path, keep_zero=keep_zero), world=1)
    assert one["stage"] == (2 if keep_zero else 0)
    two = spawn_gloo(_set_dir(_two_workers_resume, tmp_path), world=2)
    assert two["samples"] == 24 and two["step"] == 3
    expected = "the ZeRO state of 1 worker, for 2" if keep_zero else "stage-0 state of 1 worker"
    assert any(expected in line for line in two["said"]), two["said"]
    for k, v in one["after"].items():
        torch.testing.assert_close(two["after"][k], v, rtol=1e-5, atol=1e-6)
    gap = max((two["restarted"][k] - v).abs().max().item() for k, v in one["after"].items())
    assert gap > 1e-4, gap  # restarting the moments would be caught


def _set_dir(fn, folder, **extra):
    """``fn`` with ``out["dir"]`` set first (spawn pickles module-level functions only)."""
    import functools

    return functools.partial(_with_dir, fn, str(folder), extra)


def _with_dir(fn, folder: str, extra: dict, rank: int, out) -> None:
    out.update(dir=folder, **extra)
    fn(rank, out)
