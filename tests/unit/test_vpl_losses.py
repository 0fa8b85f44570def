"""VPL phase-2 losses (METHODS.md 2.3) against independent loop/numpy references:
Regional Semantic Contrast (region_masks, rsc_loss, RSCLoss) and the balanced CE."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from wsss_ray.losses.rsc import RSCLoss, region_masks, rsc_loss
from wsss_ray.losses.segmentation import balanced_ce
from wsss_ray.models.decoder import SegDecoder

# ---------------------------------------------------------------- references (loops / numpy)


def _ref_masks(feats, protos, row_class, present):
    """Loop reference: each pixel to the allowed row with the largest W f / |f|."""
    feats, protos = np.asarray(feats, np.float64), np.asarray(protos, np.float64)
    b_, n_, _ = feats.shape
    r_ = protos.shape[0]
    out = np.zeros((b_, r_, n_), bool)
    for b in range(b_):
        allowed = [r for r in range(r_) if row_class[r] == 0 or present[b][row_class[r]]]
        for n in range(n_):
            f = feats[b, n] / np.linalg.norm(feats[b, n])
            scores = [float(protos[r] @ f) for r in allowed]
            out[b, allowed[int(np.argmax(scores))], n] = True
    return out


def _ref_rsc(embed_bnd, masks, protos, tau):
    """Loop reference of the InfoNCE over non-empty regions; returns (loss, n, acc)."""
    embed_bnd, protos = np.asarray(embed_bnd, np.float64), np.asarray(protos, np.float64)
    masks = np.asarray(masks, bool)
    w = [p / math.sqrt(sum(x * x for x in p)) for p in protos]
    terms, hits = [], 0
    for b in range(masks.shape[0]):
        for r in range(masks.shape[1]):
            idx = [n for n in range(masks.shape[2]) if masks[b, r, n]]
            if not idx:
                continue
            v = sum(embed_bnd[b, n] for n in idx) / len(idx)
            v = v / math.sqrt(float(v @ v))
            cos = [float(v @ wr) for wr in w]
            lse = math.log(sum(math.exp(c / tau) for c in cos))
            terms.append(lse - cos[r] / tau)
            hits += int(int(np.argmax(cos)) == r)
    if not terms:
        return 0.0, 0, 0.0
    return sum(terms) / len(terms), len(terms), hits / len(terms)


def _ref_balanced_ce(logits, labels, ignore=255):
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels)
    bg, fg = [], []
    b_, _, h_, w_ = logits.shape
    for b in range(b_):
        for i in range(h_):
            for j in range(w_):
                y = int(labels[b, i, j])
                if y == ignore:
                    continue
                z = logits[b, :, i, j]
                ce = math.log(sum(math.exp(v) for v in z)) - z[y]
                (bg if y == 0 else fg).append(ce)
    means = [sum(g) / len(g) for g in (bg, fg) if g]
    return sum(means) / len(means) if means else 0.0


# ---------------------------------------------------------------- region_masks

# 4 rows in 2-d: two background words (classes 0, 0), class 1, class 2.
W_HAND = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
ROWS_HAND = torch.tensor([0, 0, 1, 2])
F_HAND = torch.tensor([[1.0, 0.1], [0.1, 1.0], [-1.0, 0.1], [0.2, -1.0]])


def test_region_masks_handcrafted():
    feats = torch.stack([F_HAND, 3.0 * F_HAND])  # feature scale is irrelevant (normalised)
    present = torch.tensor([[True, True, False], [False, False, True]])  # bg allowed regardless
    m = region_masks(feats, W_HAND, ROWS_HAND, present)
    assert m.shape == (2, 4, 4) and m.dtype == torch.bool
    # image 0 (class 1 present): pixel 3 points at class 2 (absent) -> next best, bg row 0
    # image 1 (class 2 present): pixel 2 points at class 1 (absent) -> next best, bg row 1
    expected = [[0, 1, 2, 0], [0, 1, 1, 3]]
    assert m.int().argmax(1).tolist() == expected
    assert (m.sum(1) == 1).all()


def test_region_masks_uses_prototype_norms():
    f = torch.tensor([[[0.6, 0.8]]])
    present = torch.ones(1, 3, dtype=torch.bool)
    assert region_masks(f, W_HAND, ROWS_HAND, present)[0, :, 0].tolist().index(True) == 1
    w = W_HAND.clone()
    w[0] *= 2.0  # 1.2 > 0.8: a longer row wins, W is not normalised
    assert region_masks(f, w, ROWS_HAND, present)[0, :, 0].tolist().index(True) == 0


def test_region_masks_matches_reference_random():
    g = torch.Generator().manual_seed(0)
    b, n, d = 3, 30, 8
    row_class = torch.tensor([0, 0, 0, 1, 2, 3, 4])
    protos = torch.randn(len(row_class), d, generator=g) * torch.rand(
        len(row_class), 1, generator=g
    )
    feats = torch.randn(b, n, d, generator=g)
    present = torch.tensor(
        [[True, True, False, False, True], [False] * 5, [False, True, True, True, True]]
    )
    m = region_masks(feats, protos, row_class, present)
    ref = _ref_masks(feats.numpy(), protos.numpy(), row_class.tolist(), present.tolist())
    assert np.array_equal(m.numpy(), ref)
    assert not m.requires_grad


def test_absent_class_never_gets_a_region():
    g = torch.Generator().manual_seed(1)
    d = 6
    row_class = torch.tensor([0, 0, 1, 2, 3])
    protos = torch.randn(5, d, generator=g)
    # every pixel is exactly the prototype of class 2 (row 3), which is absent
    feats = protos[3].expand(1, 10, d).clone()
    present = torch.tensor([[True, True, False, True]])
    m = region_masks(feats, protos, row_class, present)
    assert not m[0, 3].any()
    assert (m.sum(1) == 1).all()
    present[0, 2] = True
    assert region_masks(feats, protos, row_class, present)[0, 3].all()


def test_region_masks_ignore_absent_prototype_rows():
    g = torch.Generator().manual_seed(2)
    row_class = torch.tensor([0, 0, 1, 2, 3])
    protos = torch.randn(5, 6, generator=g)
    feats = torch.randn(2, 25, 6, generator=g)
    present = torch.tensor([[True, True, False, True], [True, False, True, False]])
    m = region_masks(feats, protos, row_class, present)
    changed = protos.clone()
    changed[3] = 10 * feats[0, 0]  # class 2, absent from image 0: its row cannot claim pixels
    m2 = region_masks(feats, changed, row_class, present)
    assert torch.equal(m[0], m2[0])


# ---------------------------------------------------------------- rsc_loss / RSCLoss


def _rsc_case(seed=3):
    g = torch.Generator().manual_seed(seed)
    b, h, w, d = 2, 3, 4, 5
    protos = torch.randn(4, d, generator=g)
    embed = torch.randn(b, d, h, w, generator=g)
    # hand-built regions (row-major pixels 0..11); row 2 empty in image 0, row 1 empty in image 1
    lab = torch.tensor([[0, 0, 0, 1, 1, 3, 3, 3, 3, 0, 1, 1], [2, 2, 2, 2, 0, 0, 3, 3, 3, 3, 3, 0]])
    masks = torch.stack([lab == r for r in range(4)], dim=1)  # B x R x N
    return embed, masks, protos


def test_rsc_matches_loop_reference():
    embed, masks, protos = _rsc_case()
    loss, met = rsc_loss(embed, masks, protos, tau=0.1)
    e_bnd = embed.flatten(2).transpose(1, 2).numpy()
    ref, n, acc = _ref_rsc(e_bnd, masks.numpy(), protos.numpy(), 0.1)
    assert met["rsc/regions"] == n == 6
    assert met["rsc/acc"] == pytest.approx(acc)
    assert float(loss) == pytest.approx(ref, rel=1e-5)
    # the B x N x D layout gives the same
    loss2, _ = rsc_loss(embed.flatten(2).transpose(1, 2), masks, protos, tau=0.1)
    assert float(loss2) == pytest.approx(ref, rel=1e-5)


def test_rsc_acc_on_aligned_regions():
    # each region's mean embedding is its own prototype -> acc 1 and a small loss
    protos = torch.eye(3)
    embed = torch.tensor([[[1.0, 0, 0], [1.0, 0.1, 0], [0, 1.0, 0], [0, 0, 1.0]]])  # B x N x D
    masks = torch.tensor([[[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]], dtype=torch.bool)
    loss, met = rsc_loss(embed, masks, protos, tau=0.1)
    assert met == {"rsc/regions": 3.0, "rsc/acc": 1.0}
    ref, _, _ = _ref_rsc(embed.numpy(), masks.numpy(), protos.numpy(), 0.1)
    assert float(loss) == pytest.approx(ref, rel=1e-3)  # ~1e-4: float32 log1p rounding
    assert float(loss) < 1e-3


def test_rsc_pixels_outside_every_region_do_not_matter():
    embed, masks, protos = _rsc_case()
    masks = masks.clone()
    masks[0, :, 5:9] = False  # pixels 5..8 of image 0 belong to no region
    embed = embed.clone().requires_grad_(True)
    loss, _ = rsc_loss(embed, masks, protos)
    loss.backward()
    g = embed.grad.flatten(2)
    assert (g[0, :, 5:9] == 0).all() and g[0, :, :5].abs().sum() > 0
    other = embed.detach().clone().flatten(2)
    other[0, :, 5:9] = 100.0
    loss2, _ = rsc_loss(other.view_as(embed), masks, protos)
    assert float(loss2) == pytest.approx(loss.item(), rel=1e-6)


def test_rsc_no_region_keeps_graph():
    embed = torch.randn(2, 5, 3, 3, requires_grad=True)
    masks = torch.zeros(2, 4, 9, dtype=torch.bool)
    loss, met = rsc_loss(embed, masks, torch.randn(4, 5))
    assert loss.item() == 0.0 and met["rsc/regions"] == 0.0
    loss.backward()
    assert embed.grad is not None and (embed.grad == 0).all()


def test_rsc_module_matches_reference_and_skips_absent_classes():
    g = torch.Generator().manual_seed(4)
    b, h, w, d = 2, 4, 5, 6
    row_class = torch.tensor([0, 0, 1, 2, 3])
    protos = torch.randn(5, d, generator=g)
    # image 0: the left half of the CLIP features points at class 2 (row 3), which is absent
    feats = torch.randn(b, h * w, d, generator=g)
    feats[0, :10] = protos[3] + 0.01 * torch.randn(10, d, generator=g)
    present = torch.tensor([[True, True, False, True], [True, True, True, True]])
    embed = torch.randn(b, d, h, w, generator=g)
    crit = RSCLoss(protos, row_class, tau_r=0.1, tau_i=0.07)
    assert list(crit.parameters()) == []
    loss, met = crit(embed, feats, present)
    ref_m = _ref_masks(feats.numpy(), protos.numpy(), row_class.tolist(), present.tolist())
    assert not ref_m[0, 3].any()
    ref, n, acc = _ref_rsc(embed.flatten(2).transpose(1, 2).numpy(), ref_m, protos.numpy(), 0.1)
    assert float(loss) == pytest.approx(ref, rel=1e-5)
    assert met["rsc/regions"] == n and met["rsc/acc"] == pytest.approx(acc)
    # with class 2 declared present, image 0 gains the class-2 region: the labels gate regions
    present2 = present.clone()
    present2[0, 2] = True
    _, met2 = crit(embed, feats, present2)
    assert met2["rsc/regions"] == met["rsc/regions"] + 1


def test_rsc_background_as_one_class_matches_a_loop():
    """rsc.background=one (METHODS 2.3): per image, one region per class in Y_i + background
    (pixels whose best allowed row belongs to that class), InfoNCE over the class prototypes,
    the background's being the normalised mean of its normalised word rows."""
    g = torch.Generator().manual_seed(5)
    b, h, w, d = 2, 4, 5, 6
    row_class = torch.tensor([0, 0, 0, 1, 2, 3])
    protos = torch.randn(6, d, generator=g)
    feats = torch.randn(b, h * w, d, generator=g)
    present = torch.tensor([[True, True, False, True], [True, False, True, True]])
    embed = torch.randn(b, d, h, w, generator=g)
    loss, met = RSCLoss(protos, row_class, 0.1, 0.07, background="one")(embed, feats, present)

    wn = torch.nn.functional.normalize(protos, dim=-1)
    bg = torch.nn.functional.normalize(wn[:3].mean(0), dim=-1)
    cls_protos = torch.cat([bg[None], wn[3:]])  # classes 0..3
    f = torch.nn.functional.normalize(feats, dim=-1)
    e = embed.flatten(2).transpose(1, 2)
    terms, hits = [], 0
    for i in range(b):
        allowed = [r for r in range(6) if row_class[r] == 0 or present[i, row_class[r]]]
        scores = f[i] @ protos.T
        best = [max(allowed, key=lambda r: float(scores[n, r])) for n in range(h * w)]
        for c in range(4):
            pix = [n for n in range(h * w) if row_class[best[n]] == c]
            if not pix:
                continue
            r = torch.nn.functional.normalize(e[i, pix].mean(0), dim=-1)
            logits = r @ torch.nn.functional.normalize(cls_protos, dim=-1).T / 0.1
            terms.append(-torch.log_softmax(logits, 0)[c])
            hits += int(logits.argmax()) == c
    assert float(loss) == pytest.approx(float(torch.stack(terms).mean()), rel=1e-5)
    assert met["rsc/regions"] == len(terms) and met["rsc/acc"] == pytest.approx(hits / len(terms))


def test_rsc_absent_prototypes_stay_negatives():
    # InfoNCE is over all R rows (METHODS "sum over c'"): an absent class forms no region, but
    # its prototype is still in the denominator, so moving it changes the loss.
    embed, masks, protos = _rsc_case()
    loss, _ = rsc_loss(embed, masks, protos)
    moved = protos.clone()
    moved[2] = -moved[2]  # row 2 has no region in image 0 and is a negative there
    assert float(rsc_loss(embed, masks, moved)[0]) != pytest.approx(float(loss), rel=1e-4)


def test_rsc_gradient_reaches_the_decoder_only():
    torch.manual_seed(0)
    dec = SegDecoder(8, 3, num_classes=4, joint_dim=6, embed_dim=16, depth=1, heads=2)
    g = torch.Generator().manual_seed(5)
    tokens = torch.randn(3, 2, 16, 8, generator=g)
    protos = torch.randn(5, 6, generator=g).requires_grad_(True)
    crit = RSCLoss(protos, torch.tensor([0, 0, 1, 2, 3]))
    out = dec(tokens, (4, 4))
    loss, met = crit(
        out["embed"], torch.randn(2, 16, 6, generator=g), torch.ones(2, 4, dtype=torch.bool)
    )
    assert met["rsc/regions"] > 0
    loss.backward()
    nonzero = [dec.fuse.weight, dec.proj.weight, *(m[0].weight for m in dec.layer_mlps)]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in nonzero)
    assert dec.classifier.weight.grad is None  # the embed head does not touch the classifier
    assert protos.grad is None and not crit.prototypes.requires_grad


# ---------------------------------------------------------------- balanced_ce


def _ce_case(seed=6):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 4, 3, 5, generator=g) * 2
    labels = torch.randint(0, 4, (2, 3, 5), generator=g)
    labels[0, 0, :3] = 255
    labels[1, 2, 1] = 255
    labels[1, 0, 0] = 0
    return logits, labels


def test_balanced_ce_matches_hand_computation():
    logits, labels = _ce_case()
    got = balanced_ce(logits, labels)
    assert got.dim() == 0
    assert float(got) == pytest.approx(_ref_balanced_ce(logits.numpy(), labels.numpy()), rel=1e-5)
    # it is not the plain pixel mean (the groups are unbalanced here)
    plain = torch.nn.functional.cross_entropy(logits, labels, ignore_index=255)
    assert float(plain) != pytest.approx(float(got), rel=1e-3)


def test_balanced_ce_ignores_255():
    logits, labels = _ce_case()
    logits = logits.requires_grad_(True)
    loss = balanced_ce(logits, labels)
    loss.backward()
    ign = (labels == 255).unsqueeze(1).expand_as(logits)
    assert (logits.grad[ign] == 0).all() and logits.grad[~ign].abs().sum() > 0
    changed = logits.detach().clone()
    changed[ign] = 50.0 * torch.randn(int(ign.sum()))
    assert float(balanced_ce(changed, labels)) == pytest.approx(loss.item(), rel=1e-6)


def test_balanced_ce_one_group_only():
    logits, _ = _ce_case()
    bg = torch.zeros(2, 3, 5, dtype=torch.long)
    bg[0, 1, 1] = 255
    assert float(balanced_ce(logits, bg)) == pytest.approx(
        _ref_balanced_ce(logits.numpy(), bg.numpy()), rel=1e-5
    )
    fg = torch.full((2, 3, 5), 2, dtype=torch.long)
    fg[1, 0, :] = 3
    assert float(balanced_ce(logits, fg)) == pytest.approx(
        _ref_balanced_ce(logits.numpy(), fg.numpy()), rel=1e-5
    )


def test_balanced_ce_all_ignore_keeps_graph():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = balanced_ce(logits, torch.full((2, 4, 4), 255, dtype=torch.long))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert (logits.grad == 0).all()


def test_balanced_ce_upsamples_logits_to_labels():
    # spatially constant logits stay constant under bilinear upsampling, so the loss at the
    # labels' 4x6 size equals the hand computation on per-pixel copies of the 2x3 logits
    z = torch.tensor([1.0, -0.5, 2.0])
    logits = z.view(1, 3, 1, 1).expand(1, 3, 2, 3).contiguous()
    labels = torch.zeros(1, 4, 6, dtype=torch.long)
    labels[0, :2] = 2
    labels[0, 3, 5] = 255
    got = balanced_ce(logits, labels)
    lse = math.log(sum(math.exp(v) for v in z.tolist()))
    expected = 0.5 * ((lse - 1.0) + (lse - 2.0))
    assert float(got) == pytest.approx(expected, rel=1e-6)
    # a non-constant map: the loss depends on where the upsampled values land (bilinear)
    ramp = torch.zeros(1, 3, 2, 3)
    ramp[0, 2] = torch.tensor([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])
    up = torch.nn.functional.interpolate(ramp, size=(4, 6), mode="bilinear", align_corners=False)
    ref = _ref_balanced_ce(up.numpy(), labels.numpy())
    assert float(balanced_ce(ramp, labels)) == pytest.approx(ref, rel=1e-5)
