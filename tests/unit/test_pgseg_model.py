"""PGSeg model: shapes per stage, Gumbel only in training, gradients through L_PG, checkpoint
loading with name mapping, and the task's loss terms."""

from __future__ import annotations

import pytest
import torch

from wsss_ray.config import PGSegPretrainConfig, load_config
from wsss_ray.models.groupvit import (
    AssignAttention,
    GroupingBlock,
    GroupingLayer,
    local_attention_mask,
)
from wsss_ray.models.pgseg import SIZES, PGSeg, load_groupvit_checkpoint
from wsss_ray.tasks import build_task


def _batch(size, b=4):
    s = SIZES[size]
    torch.manual_seed(0)
    tokens = torch.randint(1, 1000, (b, s.context_length))
    tokens[:, 9:] = 0
    return {"image": torch.randn(b, 3, s.image_size, s.image_size), "text": tokens}


def test_output_shapes_per_stage():
    m = PGSeg("tiny")
    s = m.size
    batch = _batch("tiny")
    out = m.encode_image(batch["image"])
    n_patches = (s.image_size // s.patch_size) ** 2
    assert out["embed"].shape == (4, s.proj_dim)
    assert len(out["stages"]) == 2
    (st1, st2) = out["stages"]
    assert st1["groups"].shape == (4, s.group_tokens[0], s.dim)
    assert st1["protos"].shape == (4, s.group_tokens[0], s.dim)
    assert st1["attn_soft"].shape == (4, s.output_groups[0], n_patches)
    assert st2["groups"].shape == (4, s.group_tokens[1], s.dim)
    assert st2["attn_soft"].shape == (4, s.output_groups[1], s.output_groups[0])
    assert out["tokens"].shape == (4, s.output_groups[1], s.dim)
    # hard assignments are one-hot over groups; soft ones are distributions over groups
    assert torch.all(st1["attn_hard"].sum(1) == 1)
    assert torch.allclose(st1["attn_soft"].sum(1), torch.ones(4, n_patches), atol=1e-5)
    text = m.encode_text(batch["text"])
    assert text["embed"].shape == (4, s.proj_dim)
    assert m.text_prototypes(text, batch["text"]).shape == (4, s.group_tokens[1], s.dim)


@pytest.mark.parametrize("residual", [True, False])
def test_segment_tokens_with_and_without_the_group_residual(residual):
    """GroupViT's segment token = assigned average (+ G) + MLP; without the residual it is a
    function of its own image tokens only: changing the tokens of other segments, with the
    assignment held fixed, leaves it unchanged."""
    torch.manual_seed(0)
    blk = GroupingBlock(16, 2, num_group=4, num_out=4, gumbel_tau=1.0, segment_residual=residual)
    blk.eval()
    x, groups = torch.randn(2, 30, 16), torch.randn(2, 4, 16)
    out, attn, g = blk(x, groups)
    xn = blk.norm_x(x)
    avg, _ = blk.assign(g, xn)  # the reference computation, step by step
    ref = avg + g if residual else avg
    ref = ref + blk.mlp_channels(blk.norm_new_x(ref))
    assert torch.allclose(out, ref, atol=1e-6)
    # perturb every image token outside segment 0; G (which attends to all tokens) changes,
    # so with the residual segment 0's token changes, without it only its own tokens count
    hard = attn["hard"][0]  # K x N
    outside = hard[0] == 0
    assert outside.any() and (~outside).any()
    x2 = x.clone()
    x2[0, outside] += torch.randn_like(x2[0, outside])
    a = blk.assign

    def fixed(g_, x_):  # the same (hard) assignment as before the perturbation
        return a.proj((hard / (hard.sum(-1, keepdim=True) + a.eps)) @ a.v_proj(x_)), attn

    a.forward = fixed
    try:
        out1, _, _ = blk(x, groups)
        out2, _, _ = blk(x2, groups)
    finally:
        del a.forward
    same = torch.allclose(out1[0, 0], out2[0, 0], atol=1e-6)
    assert same != residual


def test_tiny_seg_has_one_stage_and_no_layer_after_it():
    m = PGSeg("tiny_seg")
    assert m.size.segment_residual is False and SIZES["vit_s"].segment_residual is True
    assert len(m.img_encoder.layers) == 2 and len(m.img_encoder.layers[1].blocks) == 0
    out = m.encode_image(_batch("tiny_seg")["image"])
    assert len(out["stages"]) == 1 and out["tokens"].shape == (4, 8, m.size.dim)


def test_local_attention_mask_against_distances():
    m = local_attention_mask(3, 4, 2, window=1)  # 12 image tokens (row-major), 2 group tokens
    assert m.shape == (14, 14) and m.dtype == torch.bool
    for i in range(12):
        for j in range(12):
            near = abs(i // 4 - j // 4) <= 1 and abs(i % 4 - j % 4) <= 1
            assert bool(m[i, j]) == near, (i, j)
    assert not m[:12, 12:].any()  # image tokens never read the group tokens
    assert m[12:].all()  # group tokens read everything


@pytest.mark.parametrize("window", [None, 1])
def test_attention_window_keeps_image_tokens_local(window):
    """Stage-1 blocks over a 6 x 6 grid: with window 1 and 2 layers, token (0, 0) depends only on
    tokens within 2 patches, so changing token (5, 5) leaves it exactly as it was, while the
    group tokens (which see everything) change; GroupViT's global attention changes both."""
    torch.manual_seed(0)
    npr = {"iters": 3, "momentum": 0.1, "ema": 0.9, "enabled": False, "hidden": 32}
    layer = GroupingLayer(16, 2, 2, 4, 4, [0.0, 0.0], 0, npr, 1.0, attn_window=window).eval()
    x = torch.randn(1, 36, 16)
    y = x.clone()
    y[0, 35] += 3.0  # token (5, 5)
    groups = layer.group_token.expand(1, -1, -1)
    with torch.no_grad():
        a = layer._blocks(torch.cat([x, groups], 1), (6, 6), 4)
        b = layer._blocks(torch.cat([y, groups], 1), (6, 6), 4)
    near = [r * 6 + c for r in range(3) for c in range(3)]  # within 2 patches of (0, 0): (0..2)^2
    assert not torch.equal(a[0, 36:], b[0, 36:])
    if window is None:
        assert not torch.equal(a[0, 0], b[0, 0])  # small (0.02 init) but real
    else:
        assert torch.equal(a[0, 0], b[0, 0])
        assert torch.equal(a[0, near], b[0, near])
        assert not torch.equal(a[0, 28], b[0, 28])  # (4, 4) is within reach of (5, 5)


def test_attention_window_follows_the_grid_of_any_input_size():
    m = PGSeg("tiny_seg").eval()
    assert m.size.attn_window is not None and SIZES["vit_s"].attn_window is None
    with torch.no_grad():
        out = m.encode_image(torch.randn(2, 3, 48, 80))  # a 6 x 10 grid, not the trained 8 x 8
    assert out["grid"] == (6, 10) and out["stages"][0]["attn_soft"].shape == (2, 8, 60)


def test_gumbel_noise_only_in_training():
    torch.manual_seed(0)
    a = AssignAttention(16)
    g, x = torch.randn(2, 4, 16), torch.randn(2, 30, 16)
    a.eval()
    (o1, d1), (o2, _) = a(g, x), a(g, x)
    assert torch.equal(o1, o2)
    assert torch.equal(d1["hard"].argmax(1), d1["soft"].argmax(1))  # eval: argmax of the softmax
    a.train()
    picks = [a(g, x)[1]["hard"].argmax(1) for _ in range(5)]
    assert any(not torch.equal(picks[0], p) for p in picks[1:])  # noise changes assignments


def test_without_gumbel_noise_training_commits_to_the_logits_argmax():
    torch.manual_seed(0)
    a = AssignAttention(16, gumbel_tau=0.5, gumbel=False)
    g, x = torch.randn(2, 4, 16), torch.randn(2, 30, 16)
    a.train()
    (o1, d1), (o2, _) = a(g, x), a(g, x)
    assert torch.equal(o1, o2)  # deterministic in training too
    assert torch.equal(d1["hard"].argmax(1), d1["soft"].argmax(1))
    o1.sum().backward()  # straight-through to softmax(logits / tau)
    assert a.q_proj.weight.grad.abs().sum() > 0 and a.k_proj.weight.grad.abs().sum() > 0


def test_straight_through_gradient_reaches_assignment_queries():
    a = AssignAttention(8)
    a.train()
    out, _ = a(torch.randn(1, 3, 8), torch.randn(1, 10, 8))
    out.sum().backward()
    assert a.q_proj.weight.grad is not None and a.q_proj.weight.grad.abs().sum() > 0


def test_lpg_alone_reaches_group_tokens():
    cfg = load_config(
        PGSegPretrainConfig,
        "configs/pgseg/tiny.yaml",
        ["model.size=tiny", "loss.it=0", "loss.pg_text=0"],
    )
    task = build_task(cfg)
    before = [m.mu0.clone() for m in task.prototype_modules]
    losses, metrics = task.training_forward(_batch("tiny"))
    assert set(losses) == {"it_loss", "pg1_loss", "pg2_loss", "pg_text_loss"}
    # every prototype module's deferred EMA was applied by the task's flush, none left pending
    assert len(before) >= 3 and all(m.deferred for m in task.prototype_modules)
    assert all(m._pending is None for m in task.prototype_modules)
    assert all(not torch.equal(b, m.mu0) for b, m in zip(before, task.prototype_modules))
    (losses["pg1_loss"] + losses["pg2_loss"]).backward()
    layers = task.model.img_encoder.layers
    assert layers[0].group_token.grad.abs().sum() > 0
    assert layers[1].group_projector[1].fc1.weight.grad.abs().sum() > 0
    for key in ("hrs_kept_1", "hrs_kept_2", "group_usage_1", "group_usage_2"):
        assert 0 <= metrics[key] <= 1


@pytest.mark.parametrize("mode", ["tokens", "reference", "none"])
def test_text_modes(mode):
    cfg = load_config(
        PGSegPretrainConfig, "configs/pgseg/tiny.yaml", ["model.size=tiny", f"npr.text_mode={mode}"]
    )
    losses, _ = build_task(cfg).training_forward(_batch("tiny"))
    assert ("pg_text_loss" in losses) == (mode != "none")
    assert all(torch.isfinite(v) for v in losses.values())


def test_loads_our_earlier_projector_names_and_a_0d_scale(tmp_path):
    """Our checkpoints before the GroupViT projector names (net.0 / net.1 / net.3) still load."""
    src = PGSeg("tiny")
    state = {}
    for k, v in src.state_dict().items():
        k = k.replace("linear_hidden.", "net.").replace("linear_out.", "net.3.")
        state[f"module.{k}"] = v
    state["module.logit_scale"] = torch.tensor(2.5)  # GroupViT keeps a 0-d scale
    torch.save({"model": state}, tmp_path / "ours_old.pth")
    dst = PGSeg("tiny")
    report = load_groupvit_checkpoint(dst, str(tmp_path / "ours_old.pth"))
    assert report["missing"] == report["unexpected"] == report["mismatched"] == []
    assert torch.equal(dst.img_projector.linear_out.weight, src.img_projector.linear_out.weight)
    assert dst.logit_scale.shape == (1,) and float(dst.logit_scale.detach()) == 2.5
    with pytest.raises(FileNotFoundError):
        load_groupvit_checkpoint(dst, str(tmp_path / "nope.pth"))


@pytest.mark.slow
def test_vit_s_one_training_step_on_cpu():
    cfg = load_config(
        PGSegPretrainConfig, None, ["model.size=vit_s", "data.image_size=224", "train.max_steps=1"]
    )
    task = build_task(cfg)
    task.train()
    opt = torch.optim.AdamW(task.parameters(), lr=1e-4)
    losses, _ = task.training_forward(_batch("vit_s", b=8))
    total = sum(losses.values())
    total.backward()
    opt.step()
    assert torch.isfinite(total)
    assert sum(p.numel() for p in task.model.parameters()) > 50e6


def test_bf16_forward_and_backward():
    """What DeepSpeed does with bf16 on: module (buffers included) and images in bf16."""
    cfg = load_config(PGSegPretrainConfig, "configs/pgseg/tiny.yaml", ["model.size=tiny"])
    task = build_task(cfg).to(torch.bfloat16)
    batch = _batch("tiny")
    batch["image"] = batch["image"].to(torch.bfloat16)
    losses, _ = task.training_forward(batch)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert task.model.img_encoder.layers[0].group_token.grad.dtype == torch.bfloat16
