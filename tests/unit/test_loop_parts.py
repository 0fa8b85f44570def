"""Pieces of the training loop that need no cluster: non-finite guard, schedule, DS config."""

from __future__ import annotations

import math

from wsss_ray.config import ClipPretrainConfig, load_config
from wsss_ray.train.deepspeed_config import deepspeed_config, total_steps
from wsss_ray.train.monitor import NonFiniteGuard
from wsss_ray.train.schedule import schedule_factor, timm_cosine, warmup_cosine


def test_nonfinite_guard_stops_after_k_in_a_row_only():
    g = NonFiniteGuard(limit=3)
    pattern = [True, False, False, True, False, False, True]
    assert all(g.update(f, i) == "" for i, f in enumerate(pattern))  # never 3 in a row
    assert g.total == 4
    assert g.update(False, 7) == "" and g.update(False, 8) == ""
    reason = g.update(False, 9)
    assert reason.startswith("3 non-finite losses in a row at step 9") and g.total == 7


def test_warmup_cosine_endpoints():
    f = warmup_cosine(lr=1e-3, min_lr=1e-5, warmup_start_lr=1e-6, warmup_steps=10, total_steps=110)
    assert math.isclose(f(0) * 1e-3, 1e-6)
    assert math.isclose(f(10) * 1e-3, 1e-3)
    assert math.isclose(f(60) * 1e-3, (1e-3 + 1e-5) / 2)
    assert math.isclose(f(110) * 1e-3, 1e-5)
    assert all(f(i) >= f(i + 1) for i in range(10, 110))


def test_timm_cosine_hand_computed_and_equal_to_timm():
    """GroupViT/PGSeg's schedule (timm CosineLRScheduler, warmup_prefix=False): 10 warm-up steps of
    30, the cosine on the absolute step, one step late as the reference calls step_update after
    the optimizer step. Hand-computed, optimizer step k uses t = max(k - 1, 0): steps 0 and 1:
    1e-6; step 6 (t 5) = 1e-6 + 5 * (1e-4 - 1e-6) / 10; step 11 (t 10) = 1e-5 + 0.5 * 9e-5 *
    (1 + cos(pi / 3)) = 7.75e-5 (a drop from 1e-4); step 16 (t 15) = 1e-5 + 0.5 * 9e-5 *
    (1 + cos(pi / 2)) = 5.5e-5; step 31 (t 30) and after: 1e-5."""
    import torch
    from timm.scheduler import CosineLRScheduler

    f = timm_cosine(lr=1e-4, min_lr=1e-5, warmup_start_lr=1e-6, warmup_steps=10, total_steps=30)
    assert math.isclose(f(0) * 1e-4, 1e-6) and math.isclose(f(1) * 1e-4, 1e-6)
    assert math.isclose(f(6) * 1e-4, 1e-6 + 5 * (1e-4 - 1e-6) / 10)
    assert math.isclose(f(11) * 1e-4, 7.75e-5)
    assert math.isclose(f(16) * 1e-4, 5.5e-5)
    assert math.isclose(f(31) * 1e-4, 1e-5) and math.isclose(f(45) * 1e-4, 1e-5)
    # and step for step the library the reference calls (timm), as main_group_vit.py builds it
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    ref = CosineLRScheduler(
        opt,
        t_initial=30,
        lr_min=1e-5,
        warmup_lr_init=1e-6,
        warmup_t=10,
        cycle_limit=1,
        t_in_epochs=False,
    )
    for step in range(40):  # the reference's loop: optimizer step with the current lr, then
        assert math.isclose(opt.param_groups[0]["lr"], f(step) * 1e-4, rel_tol=1e-9), step
        ref.step_update(step)  # step_update(epoch * num_steps + idx)
    # and it is what optim.schedule=timm_cosine selects
    cfg = load_config(
        ClipPretrainConfig, None, ["optim.schedule=timm_cosine", "train.max_steps=30"]
    )
    assert schedule_factor(cfg.optim, 30)(15) == timm_cosine(1e-4, 1e-5, 1e-6, 0, 30)(15)


def test_deepspeed_config_and_length_from_samples():
    cfg = load_config(
        ClipPretrainConfig,
        None,
        [
            "train.max_samples=1000",
            "train.batch_size_per_worker=8",
            "train.grad_accum=2",
            "scaling.num_workers=4",
            "train.zero_stage=2",
        ],
    )
    assert total_steps(cfg) == math.ceil(1000 / 64)
    ds = deepspeed_config(cfg)
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] is False
    assert ds["gradient_clipping"] == 5.0
    gpu = load_config(ClipPretrainConfig, None, ["train.max_steps=1", "scaling.use_gpu=true"])
    assert deepspeed_config(gpu)["bf16"]["enabled"] is True


def _norm_stats_worker(rank, out):
    import torch

    from wsss_ray.train.monitor import average_norm_stats

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    net.train()
    torch.manual_seed(100 + rank)  # each worker sees its own batches
    for _ in range(3):
        net(torch.randn(8, 3) * (rank + 1) + rank)
    bn = net[1]
    out[f"before{rank}"] = (bn.running_mean.clone(), bn.running_var.clone())
    out[f"n{rank}"] = average_norm_stats(net)
    out[f"after{rank}"] = (bn.running_mean.clone(), bn.running_var.clone())


def test_norm_stats_are_averaged_over_workers():
    """CPU workers have no SyncBatchNorm: the loop averages BN statistics before validation and
    checkpoints, so every worker (and the checkpoint) holds the same eval-mode model."""
    import torch
    from _dist import spawn_gloo

    out = spawn_gloo(_norm_stats_worker, world=2)
    assert out["n0"] == out["n1"] == 2
    (m0, v0), (m1, v1) = out["before0"], out["before1"]
    assert not torch.allclose(m0, m1)  # the workers had drifted apart
    for rank in (0, 1):
        mean, var = out[f"after{rank}"]
        torch.testing.assert_close(mean, (m0 + m1) / 2)
        torch.testing.assert_close(var, (v0 + v1) / 2)


def test_logit_scales_take_weight_decay_only_as_the_reference():
    from wsss_ray.config import PGSegPretrainConfig
    from wsss_ray.tasks import build_task

    cfg = load_config(PGSegPretrainConfig, "configs/pgseg/tiny.yaml", ["model.size=tiny"])
    task = build_task(cfg)
    scales = {id(p) for n, p in task.named_parameters() if n.endswith("logit_scale")}
    assert len(scales) == 2  # image-text and the shared L_PG scale
    for flag in (False, True):
        decay, no_decay = task.param_groups(0.05, flag)
        assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
        in_decay = {id(p) for p in decay["params"]}
        assert (scales <= in_decay) == flag and not (scales & in_decay and not flag)
        assert all(p.ndim > 1 for p in decay["params"] if id(p) not in scales)


def test_pgseg_synchronises_only_the_projector_batchnorms():
    """The reference converts img/text_projector to SyncBatchNorm, not NPR's mapping_x."""
    import torch

    from wsss_ray.config import PGSegPretrainConfig
    from wsss_ray.tasks import build_task

    over = ["model.size=tiny", "npr.reconstruction=reference"]
    task = build_task(load_config(PGSegPretrainConfig, "configs/pgseg/tiny.yaml", over))
    task = task.sync_batchnorm()
    kinds = {
        n: type(m)
        for n, m in task.named_modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    }
    synced = sorted(n for n, k in kinds.items() if k is torch.nn.SyncBatchNorm)
    assert synced == ["model.img_projector.linear_hidden.1", "model.text_projector.linear_hidden.1"]
    assert any(".recon." in n for n, k in kinds.items() if k is torch.nn.BatchNorm1d)


def test_stall_guard_flags_a_frozen_loss_and_a_dead_or_exploding_gradient():
    from wsss_ray.train.monitor import StallGuard

    g = StallGuard(3)
    assert [g.update(x, 1.0) for x in (5.0, 4.0, 3.5, 3.2)] == ["", "", "", ""]
    assert not g.stalled
    said = [g.update(4.6164, 1.0) for _ in range(4)]  # lr=1e3: the loss freezes
    assert said[:3] == ["", "", ""] and "loss unchanged at 4.6164 for 3 reports" in said[3]
    assert g.stalled
    assert g.update(4.0, 1.0) == "" and not g.stalled  # it recovered: not a failure
    assert "exploded" in [g.update(4.0 - i, float("inf")) for i in range(3)][-1]
    g = StallGuard(2)
    assert "collapsed" in [g.update(3.0 - i, 0.0) for i in range(2)][-1]
    off = StallGuard(0)
    assert all(off.update(1.0, 0.0) == "" for _ in range(10)) and not off.stalled
