"""WeCLIP-style phase 2 pieces against independent computations written here from WeCLIP's
formulas (``WeCLIP_model/PAR.py``, ``utils/camutils.py:cams_to_affinity_label``,
``utils/losses.py:get_aff_loss``, ``clip/clip_tool.py:perform_single_voc_cam``,
``WeCLIP_model/segformer_head.py``, ``Decoder/TransDecoder.py``), and the task's online
labels, RFM and affinity loss switched on as configured."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from wsss_ray.losses.affinity import affinity_label, affinity_loss, radius_mask
from wsss_ray.models.decoder import WeCLIPDecoder
from wsss_ray.ops.affinity import rfm_attention
from wsss_ray.ops.par import OFFSETS, par_refine


def _par_loop(img: np.ndarray, maps: np.ndarray, dilations, iters, w1=0.3, w2=0.01):
    """PAR pixel by pixel: neighbours by clamped coordinates (= replicate padding)."""
    c, h, w = img.shape
    nbs = [(dy * d, dx * d, d * (math.sqrt(2) if dy and dx else 1.0)) for d in dilations
           for dy, dx in OFFSETS]  # fmt: skip
    dist = np.array([n[2] for n in nbs])
    pos = -(((dist / dist.std(ddof=1)) / w1) ** 2)
    pos = np.exp(pos - pos.max())
    pos /= pos.sum()

    def at(a, y, x):
        return a[:, min(max(y, 0), h - 1), min(max(x, 0), w - 1)]

    aff = np.zeros((h, w, len(nbs)))
    for y in range(h):
        for x in range(w):
            vals = np.stack([at(img, y + oy, x + ox) for oy, ox, _ in nbs], 1)  # C x M
            std = vals.std(1, ddof=1, keepdims=True)
            k = -(((np.abs(vals - img[:, y, x][:, None]) / (std + 1e-8)) / w1) ** 2)
            k = k.mean(0)
            e = np.exp(k - k.max())
            aff[y, x] = e / e.sum() + w2 * pos
    m = maps.copy()
    for _ in range(iters):
        new = np.zeros_like(m)
        for y in range(h):
            for x in range(w):
                vals = np.stack([at(m, y + oy, x + ox) for oy, ox, _ in nbs], 1)
                new[:, y, x] = (vals * aff[y, x]).sum(1)
        m = new
    return m


def test_par_equals_pixel_loop():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(3, 7, 9))
    maps = rng.random((2, 7, 9))
    ours = par_refine(
        torch.tensor(img)[None], torch.tensor(maps)[None], num_iter=3, dilations=(1, 2)
    )[0]
    ref = _par_loop(img, maps, (1, 2), 3)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_radius_mask_and_affinity_label_hand_computed():
    m = radius_mask(3, 4, 1)
    for i in range(12):
        for j in range(12):
            near = abs(i // 4 - j // 4) <= 1 and abs(i % 4 - j % 4) <= 1
            assert bool(m[i, j]) == near
    labels = torch.tensor([[[1, 1, 0, 0], [1, 1, 0, 0], [255, 255, 2, 2], [255, 255, 2, 2]]])
    t = affinity_label(labels, (2, 2), radius_mask(2, 2, 0))  # grid cells: 1, 0, 255, 2
    assert t.shape == (1, 4, 4)
    assert t[0, 0, 0] == 1 and t[0, 1, 1] == 1 and t[0, 3, 3] == 1  # the diagonal, in-window
    assert (t[0, 2] == 255).all() and (t[0, :, 2] == 255).all()  # ignored cell
    assert t[0, 0, 1] == 255  # outside a radius-0 window
    t1 = affinity_label(labels, (2, 2), radius_mask(2, 2, 1))
    assert t1[0, 0, 1] == 0 and t1[0, 0, 3] == 0 and t1[0, 0, 0] == 1


def test_affinity_loss_formula():
    pred = torch.tensor([[[0.9, 0.2], [0.4, 0.7]]])
    target = torch.tensor([[[1, 0], [255, 1]]])
    pos = ((1 - 0.9) + (1 - 0.7)) / (2 + 1)
    neg = 0.2 / (1 + 1)
    assert affinity_loss(pred, target).item() == pytest.approx(0.5 * pos + 0.5 * neg)


def test_rfm_attention_keeps_the_blocks_below_the_mean_difference():
    g = torch.Generator().manual_seed(0)
    attn = torch.rand(6, 5, 5, generator=g)
    seg = torch.rand(5, 5, generator=g)
    diff = [(seg - attn[i]).sum().item() for i in range(6)]
    keep = [i for i in range(6) if diff[i] <= np.mean(diff)]
    ref = attn[keep].mean(0) * seg
    torch.testing.assert_close(rfm_attention(attn, seg), ref, rtol=1e-4, atol=1e-6)


def test_weclip_decoder_structure_and_no_positional_encoding():
    torch.manual_seed(0)
    dec = WeCLIPDecoder(in_dim=16, num_layers=3, num_classes=5, joint_dim=8, embed_dim=32,
                        depth=2, heads=4).eval()  # fmt: skip
    assert isinstance(dec.layer_mlps[0][1], torch.nn.ReLU) and len(dec.layer_mlps) == 3
    assert isinstance(dec.dropout, torch.nn.Dropout2d) and not hasattr(dec, "pos_conv")
    tokens = torch.randn(4, 2, 12, 16)  # 4 blocks given, the first 3 used
    out = dec(tokens, (3, 4))
    assert out["logits"].shape == (2, 5, 3, 4) and out["affinity"].shape == (2, 12, 12)
    same = dec(tokens[:3], (3, 4))
    torch.testing.assert_close(out["logits"], same["logits"])
    # affinity = sigmoid(F^T F) of the fused features (eval: no dropout)
    per = [dec.layer_mlps[i](tokens[i]) for i in range(3)]
    fused = dec.fuse(torch.cat(per, -1).transpose(1, 2).reshape(2, -1, 3, 4)).flatten(2)
    torch.testing.assert_close(out["affinity"], torch.sigmoid(fused.transpose(1, 2) @ fused))
    # no positional encoding anywhere: permuting the patches permutes the outputs
    perm = torch.randperm(12)
    shuffled = dec(tokens[:, :, perm], (3, 4))
    torch.testing.assert_close(
        shuffled["logits"].flatten(2), out["logits"].flatten(2)[:, :, perm], rtol=1e-4, atol=1e-5
    )


def _online_task(tmp_path, **overrides):
    from wsss_ray.config import VPLTrainConfig, load_config
    from wsss_ray.models.clip import create_clip
    from wsss_ray.tasks.vpl import VPLSegTask

    torch.manual_seed(0)
    weights = tmp_path / "tiny.pt"
    torch.save(create_clip("wsss-tiny").state_dict(), weights)
    args = [
        f"clip.weights={weights}",
        "clip.name=wsss-tiny",
        "online.enabled=true",
        "train.max_steps=10",
        "decoder.style=weclip",
        "decoder.embed_dim=32",
        "decoder.depth=1",
        "decoder.heads=4",
        "rsc.weight=0",
        "online.par_iters=2",
        "online.par_dilations=[1,2]",
        *[f"{k}={v}" for k, v in overrides.items()],
    ]
    cfg = load_config(VPLTrainConfig, None, args)
    names = ["background", "circle", "square", "triangle"]
    return VPLSegTask(cfg, 4, names, "voc")


def test_online_labels_rfm_and_affinity_loss_are_active(tmp_path):
    task = _online_task(tmp_path, **{"online.rfm_start": 1})
    images = torch.randn(2, 3, 32, 32)
    valid = torch.zeros(2, 32, 32, dtype=torch.long)
    valid[1, :, 24:] = 255  # crop padding of the second image
    present = torch.tensor([[1, 1, 0, 1], [1, 0, 1, 0]], dtype=torch.uint8)
    batch = {"image": images, "label": valid, "present": present}
    losses, metrics = task.training_forward(batch)
    assert set(losses) == {"seg_loss", "aff_loss"} and metrics["online/rfm"] == 0.0
    assert losses["aff_loss"].requires_grad and losses["seg_loss"].requires_grad
    losses, metrics = task.training_forward(batch)  # step 1: RFM on
    assert metrics["online/rfm"] == 1.0 and int(task.online_step[0]) == 2
    # the labels: only each image's classes (or background), padding ignored
    out = task.dense(images, attn_layers=task.labeler.attn_layers, cam=True, tokens=True)
    labels = task.labeler(images, out, present, valid != 255)
    assert set(labels[0].unique().tolist()) <= {0, 1, 3}
    assert set(labels[1, :, :24].unique().tolist()) <= {0, 2}
    assert (labels[1, :, 24:] == 255).all()
    # RFM changes the attention the CAMs are refined with
    aff = torch.rand(2, 16, 16)
    assert not torch.equal(task.labeler(images, out, present, valid != 255, aff), labels)
    # the frozen CLIP gets no gradient, the decoder does
    (losses["seg_loss"] + losses["aff_loss"]).backward()
    assert all(p.grad is None for p in task.dense.parameters())
    assert all(p.grad is not None for p in task.decoder.layer_mlps.parameters())


def test_online_vision_prototypes_with_rsc_on_top(tmp_path):
    """VPL on WeCLIP: online CAMs from phase-1 W, the affinity loss and RSC together."""
    torch.manual_seed(1)
    W = torch.randn(3 + 2, 128)  # 3 classes + 2 background words, the tiny CLIP's joint space
    protos = tmp_path / "prototypes.pt"
    torch.save({"W": W, "num_fg": 3, "tau_i": 0.07}, protos)
    task = _online_task(
        tmp_path,
        **{"online.prototypes": "vision", "rsc.weight": 0.1, "phase1.prototypes": str(protos)},
    )
    assert task.labeler.tau == 0.07 and task.rsc is not None and task.rsc.background == "one"
    images = torch.randn(2, 3, 32, 32)
    batch = {
        "image": images,
        "label": torch.zeros(2, 32, 32, dtype=torch.long),
        "present": torch.tensor([[1, 1, 0, 1], [1, 0, 1, 0]], dtype=torch.uint8),
    }
    losses, metrics = task.training_forward(batch)
    assert set(losses) == {"seg_loss", "aff_loss", "rsc_loss"} and metrics["rsc/regions"] > 0
