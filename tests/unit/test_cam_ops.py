"""CLIP-ES seed ops on handcrafted cases: softmax-GradCAM against its closed form for a linear
head and where it peaks, the CAA transition against a numpy loop, box masks drawn by hand,
affinity spreading within a group only, and pseudo-labels / confidence filtering / dense CRF."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from wsss_ray.ops.affinity import attention_transition, box_mask, caa_refine
from wsss_ray.ops.cam import minmax_normalise, softmax_gradcam, upsample_cams
from wsss_ray.ops.crf import (
    confidence_filter,
    crf_available,
    dense_crf,
    pseudo_label,
    stack_background,
)

# ----------------------------------------------------------------------------- softmax-GradCAM


def _two_region_case():
    """4 x 4 grid, C = 3: the top-left 2 x 2 tokens carry e0, the bottom-right 2 x 2 carry e1,
    the rest carry e2. A linear head maps e0 -> class 0, e1 -> class 1, e2 -> background (2)."""
    h = w = 4
    a = torch.zeros(1, h, w, 3)
    a[0, :, :, 2] = 1.0
    a[0, :2, :2] = torch.tensor([1.0, 0, 0])
    a[0, 2:, 2:] = torch.tensor([0, 1.0, 0])
    head = 4.0 * torch.eye(3)  # C x K
    return a.reshape(1, h * w, 3), head, (h, w)


def _closed_form_cam(a_BNC, head_CK, targets):
    """d softmax_t(mean_n(A_n) @ H) / d A_{n,c} = p_t (H_{c,t} - sum_j p_j H_{c,j}) / N for every
    token n, so the GradCAM weights are that expression; CAM = ReLU(A w), min-max per map."""
    n = a_BNC.shape[1]
    p = (a_BNC.mean(1) @ head_CK).softmax(-1)  # B x K
    out = []
    for t in targets:
        w = p[:, t : t + 1] * (head_CK[:, t][None] - p @ head_CK.T) / n  # B x C
        cam = torch.einsum("bnc,bc->bn", a_BNC, w).relu()
        lo = cam.amin(1, keepdim=True)
        hi = (cam - lo).amax(1, keepdim=True)
        out.append((cam - lo) / torch.where(hi > 0, hi, torch.ones_like(hi)))
    return torch.stack(out, 1)


def test_gradcam_peaks_in_each_class_region():
    a, head, grid = _two_region_case()
    acts = a.clone().requires_grad_(True)
    cams = softmax_gradcam(acts, acts.mean(1) @ head, targets=[0, 1], grid=grid)
    assert cams.shape == (1, 2, 4, 4) and not cams.requires_grad
    assert cams.min() >= 0 and cams.max() <= 1
    region0 = torch.zeros(4, 4, dtype=torch.bool)
    region0[:2, :2] = True
    region1 = torch.zeros(4, 4, dtype=torch.bool)
    region1[2:, 2:] = True
    torch.testing.assert_close(cams[0, 0][region0], torch.ones(4), atol=1e-5, rtol=0)
    assert torch.all(cams[0, 0][~region0] == 0)
    torch.testing.assert_close(cams[0, 1][region1], torch.ones(4), atol=1e-5, rtol=0)
    assert torch.all(cams[0, 1][~region1] == 0)


def test_gradcam_matches_closed_form_for_a_linear_head():
    g = torch.Generator().manual_seed(0)
    b, h, w, c, k = 3, 3, 5, 8, 6
    a = torch.randn(b, h * w, c, generator=g, dtype=torch.float64)
    head = torch.randn(c, k, generator=g, dtype=torch.float64)
    acts = a.clone().requires_grad_(True)
    targets = [0, 3, 4]  # columns 1, 2, 5 act as background prompts in the softmax
    cams = softmax_gradcam(acts, acts.mean(1) @ head, targets, (h, w))
    want = _closed_form_cam(a, head, targets).reshape(b, len(targets), h, w).float()
    assert cams.shape == (b, 3, h, w)
    torch.testing.assert_close(cams, want, atol=1e-5, rtol=0)
    # each map spans [0, 1] unless it is all zero
    flat = cams.flatten(2)
    assert torch.all(flat.amin(-1) == 0)
    peak = flat.amax(-1)
    assert torch.all((peak == 0) | ((peak - 1).abs() < 1e-6))


def test_gradcam_frees_graph_unless_retained_and_rejects_bad_input():
    a, head, grid = _two_region_case()
    acts = a.clone().requires_grad_(True)
    logits = acts.mean(1) @ head
    first = softmax_gradcam(acts, logits, [0], grid, retain_graph=True)
    again = softmax_gradcam(acts, logits, [0], grid)  # graph still there; freed now
    torch.testing.assert_close(first, again)
    with pytest.raises(RuntimeError):
        softmax_gradcam(acts, logits, [1], grid)
    with pytest.raises(ValueError):
        softmax_gradcam(acts, (acts.mean(1) @ head).detach(), [0], grid)
    with pytest.raises(ValueError):
        softmax_gradcam(acts, acts.mean(1) @ head, [0], (3, 5))
    with pytest.raises(IndexError):
        softmax_gradcam(acts, acts.mean(1) @ head, [3], grid)


def test_minmax_and_upsample():
    x = torch.tensor([[[2.0, 4.0], [6.0, 10.0]], [[0.0, 0.0], [0.0, 0.0]]])
    y = minmax_normalise(x, (-2, -1))
    torch.testing.assert_close(y[0], torch.tensor([[0.0, 0.25], [0.5, 1.0]]), atol=1e-6, rtol=0)
    assert torch.all(y[1] == 0)
    up = upsample_cams(x[None], (8, 6))
    assert up.shape == (1, 2, 8, 6)
    assert up.min() >= 0 and abs(up[0, 0].max().item() - 1) < 1e-5 and up[0, 0].min() == 0
    assert torch.all(up[0, 1] == 0)
    assert upsample_cams(x[0], (4, 4)).shape == (4, 4)


# ----------------------------------------------------------------------------- CAA affinity


def _transition_reference(attn_LNN: np.ndarray, n_iter: int) -> np.ndarray:
    a = attn_LNN.mean(0)
    n = a.shape[0]
    t = a.copy()
    for _ in range(n_iter):
        col = [sum(t[i, j] for i in range(n)) for j in range(n)]
        t = np.array([[t[i, j] / col[j] for j in range(n)] for i in range(n)])
        row = [sum(t[i, j] for j in range(n)) for i in range(n)]
        t = np.array([[t[i, j] / row[i] for j in range(n)] for i in range(n)])
    s = np.array([[(t[i, j] + t[j, i]) / 2 for j in range(n)] for i in range(n)])
    return np.array(
        [[sum(s[i, m] * s[m, j] for m in range(n)) for j in range(n)] for i in range(n)]
    )


def test_attention_transition_matches_numpy_loop_and_is_symmetric():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 12, 12))
    attn = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)  # row-softmax, like attention
    t = attention_transition(torch.from_numpy(attn), n_iter=3)
    assert t.shape == (12, 12)
    np.testing.assert_allclose(t.numpy(), _transition_reference(attn, 3), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(t, t.T)
    one = attention_transition(torch.from_numpy(attn[0]).float(), n_iter=1)
    np.testing.assert_allclose(one.numpy(), _transition_reference(attn[:1], 1), rtol=1e-5)


def test_box_mask_hand_drawn():
    cam = np.zeros((6, 7), dtype=np.float32)
    cam[0, 1] = cam[1, 1] = cam[1, 2] = 1.0  # L shape: box rows 0-1, cols 1-2
    cam[2, 3] = 0.8  # touches (1, 2) diagonally: same component under 8-connectivity
    cam[4, 5] = cam[5, 6] = 0.6  # diagonal pair: one box rows 4-5, cols 5-6
    cam[4, 0] = 0.3  # below 0.4 * max: no box
    want = np.zeros((6, 7), dtype=np.float32)
    want[0:3, 1:4] = 1
    want[4:6, 5:7] = 1
    m = box_mask(cam, 0.4)
    assert m.shape == (42,) and m.dtype == torch.float32
    np.testing.assert_array_equal(m.numpy().reshape(6, 7), want)
    # from a tensor, with a higher threshold only the first component survives
    m2 = box_mask(torch.from_numpy(cam), 0.7).reshape(6, 7).numpy()
    want2 = np.zeros_like(want)
    want2[0:3, 1:4] = 1
    np.testing.assert_array_equal(m2, want2)
    assert box_mask(np.zeros((3, 3)), 0.4).sum() == 0


def _two_group_transition():
    """2 x 4 grid; the top row (tokens 0-3) and the bottom row (4-7) attend only within."""
    g = torch.Generator().manual_seed(1)
    attn = torch.zeros(3, 8, 8)
    attn[:, :4, :4] = torch.rand(3, 4, 4, generator=g) + 0.1
    attn[:, 4:, 4:] = torch.rand(3, 4, 4, generator=g) + 0.1
    attn = attn / attn.sum(-1, keepdim=True)
    return attention_transition(attn)


def test_caa_spreads_within_a_group_only():
    trans = _two_group_transition()
    cam = torch.zeros(3, 2, 4)
    cam[0, 0, 1] = 1.0  # hits token 1 of the top group
    cam[1, 1, 2] = 0.7  # hits token 6 of the bottom group
    out = caa_refine(cam, trans)
    assert out.shape == (3, 2, 4)
    assert out.min() >= 0 and out.max() <= 1
    assert torch.all(out[0, 0] > 0) and torch.all(out[0, 1] == 0)
    assert torch.all(out[1, 1] > 0) and torch.all(out[1, 0] == 0)
    assert torch.all(out[2] == 0)  # an all-zero CAM stays zero
    assert abs(out[0].max().item() - 1) < 1e-5


def test_caa_box_mask_is_class_aware():
    trans = _two_group_transition()
    cam = torch.zeros(1, 2, 4)
    cam[0, 0, 1] = 1.0
    cam[0, 1, 2] = 0.3  # weak second blob: outside the boxes at 0.4, inside at 0.2
    strict = caa_refine(cam, trans, box_thresh=0.4)
    assert torch.all(strict[0, 1] == 0)
    loose = caa_refine(cam, trans, box_thresh=0.2)
    assert loose[0, 1].max() > 0.01  # the weak blob now spreads over its group
    # equals the CLIP-ES form (trans * aff_mask) @ vec(cam)
    mask = box_mask(cam[0], 0.2)
    ref = minmax_normalise(((trans * mask[None, :]) @ cam[0].flatten()).reshape(2, 4), (0, 1))
    torch.testing.assert_close(loose[0], ref)


# ----------------------------------------------------------------------------- pseudo-labels


def test_confidence_filter_exact():
    probs = np.array(
        [
            [[0.97, 0.50], [0.02, 0.10]],
            [[0.02, 0.40], [0.96, 0.10]],
            [[0.01, 0.10], [0.02, 0.80]],
        ]
    )
    want = np.array([[0, 255], [1, 255]], dtype=np.uint8)
    got = confidence_filter(probs)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(
        confidence_filter(torch.from_numpy(probs), thresh=0.5, class_ids=[0, 15, 3]),
        np.array([[0, 0], [15, 3]], dtype=np.uint8),
    )


def test_pseudo_label_exact():
    cams = np.array(
        [
            [[0.9, 0.2, 0.5], [0.0, 0.6, 0.3]],  # class 15
            [[0.1, 0.7, 0.5], [0.0, 0.1, 0.6]],  # class 3
        ],
        dtype=np.float32,
    )
    # background 1 - max: [[0.1, 0.3, 0.5], [1.0, 0.4, 0.4]]; (0,2) ties three ways -> background
    want = np.array([[15, 3, 0], [0, 15, 3]], dtype=np.uint8)
    got = pseudo_label(cams, [15, 3])
    assert got.dtype == np.uint8 and got.shape == (2, 3)
    np.testing.assert_array_equal(got, want)
    # alpha > 1 shrinks the background score: (0, 2) 0.5^2 = 0.25 < 0.5 -> class 15 (first)
    want_a2 = np.array([[15, 3, 15], [0, 15, 3]], dtype=np.uint8)
    np.testing.assert_array_equal(pseudo_label(torch.from_numpy(cams), [15, 3], alpha=2.0), want_a2)
    stacked = stack_background(cams)
    assert stacked.shape == (3, 2, 3)
    np.testing.assert_allclose(stacked[0], 1 - cams.max(0))
    np.testing.assert_array_equal(pseudo_label(np.zeros((0, 2, 2)), []), np.zeros((2, 2)))
    with pytest.raises(ValueError):
        pseudo_label(cams, [0, 3])
    with pytest.raises(ValueError):
        pseudo_label(cams, [15])


def test_dense_crf_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    assert not crf_available()
    with pytest.raises(ImportError, match=r"wsss_ray\[crf\]"):
        dense_crf(np.zeros((4, 4, 3), np.uint8), np.full((2, 4, 4), 0.5))


def test_dense_crf_follows_image_edges():
    pytest.importorskip("pydensecrf.densecrf")
    assert crf_available()
    h, w = 16, 16
    image = np.zeros((h, w, 3), np.uint8)
    image[:, 8:] = 255  # left half black, right half white
    rng = np.random.default_rng(0)
    fg = np.where(np.arange(w)[None, :] >= 8, 0.7, 0.3) + rng.uniform(-0.25, 0.25, (h, w))
    probs = np.stack([1 - fg, fg]).astype(np.float32)
    assert (probs.argmax(0) != (np.arange(w)[None, :] >= 8)).any()  # the noise flips pixels
    q = dense_crf(image, probs)
    assert q.shape == (2, h, w) and q.dtype == np.float32
    np.testing.assert_allclose(q.sum(0), 1, atol=1e-4)
    np.testing.assert_array_equal(q.argmax(0), np.broadcast_to(np.arange(w) >= 8, (h, w)))


def test_crf_image_reproduces_clip_es_input_quirk():
    """CLIP-ES eval_cam_with_crf.py: cv2 BGR float image minus the BGR mean, then
    ``astype(np.uint8)`` (negative values wrap); ``rgb`` passes the image through."""
    from wsss_ray.ops.crf import CLIP_ES_MEAN_BGR, crf_image

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    assert np.array_equal(crf_image(image, "rgb"), image)
    quirk = crf_image(image, "clip_es")
    # the reference's expression, literally (x86 numpy wraps a negative float -> uint8 cast)
    bgr = image[..., ::-1].astype(np.float32)
    bgr -= np.array(CLIP_ES_MEAN_BGR, np.float32)
    assert np.array_equal(quirk, bgr.astype(np.uint8))
    black = crf_image(np.zeros((1, 1, 3), np.uint8), "clip_es")[0, 0]
    assert black.tolist() == [256 - 104, 256 - 116, 256 - 122]  # B, G, R of -mean, wrapped
    with pytest.raises(ValueError, match="rgb, clip_es"):
        crf_image(image, "bgr")
