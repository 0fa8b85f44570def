"""The gathered contrastive loss on 2 gloo workers equals the single-process loss (and
gradient) on the same global batch."""

from __future__ import annotations

import torch
from _dist import spawn_gloo

from wsss_ray.losses.contrastive import GatheredContrastiveLoss

B, D = 6, 8


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2 * B, D, generator=g), torch.randn(2 * B, D, generator=g)


def _reference(img, txt, log_scale):
    img, txt = (
        torch.nn.functional.normalize(img, dim=-1),
        torch.nn.functional.normalize(txt, dim=-1),
    )
    logits = log_scale.exp() * img @ txt.T
    y = torch.arange(len(img))
    return 0.5 * (
        torch.nn.functional.cross_entropy(logits, y)
        + torch.nn.functional.cross_entropy(logits.T, y)
    )


def _worker(rank, out):
    img, txt = _batch()
    img = img[rank * B : (rank + 1) * B].clone().requires_grad_(True)
    txt = txt[rank * B : (rank + 1) * B].clone().requires_grad_(True)
    log_scale = torch.full((1,), 2.0, requires_grad=True)
    loss = GatheredContrastiveLoss()(img, txt, log_scale)
    loss.backward()
    out[rank] = (loss.item(), img.grad.clone(), txt.grad.clone(), log_scale.grad.clone())


def test_two_workers_equal_single_process():
    out = spawn_gloo(_worker)

    img, txt = _batch()
    img.requires_grad_(True)
    txt.requires_grad_(True)
    log_scale = torch.full((1,), 2.0, requires_grad=True)
    ref = _reference(img, txt, log_scale)
    ref.backward()

    mean_loss = (out[0][0] + out[1][0]) / 2
    assert abs(mean_loss - ref.item()) < 1e-5
    # DeepSpeed averages gradients over workers: each worker's feature grads, divided by 2,
    # must equal the reference's grads for its rows
    assert torch.allclose(torch.cat([out[0][1], out[1][1]]) / 2, img.grad, atol=1e-6)
    assert torch.allclose(torch.cat([out[0][2], out[1][2]]) / 2, txt.grad, atol=1e-6)
    assert torch.allclose((out[0][3] + out[1][3]) / 2, log_scale.grad, atol=1e-6)
