"""Zero-shot inference pieces on handcrafted cases: chained assignments, top-k restricted
affinity, pixel scores, background thresholding, sliding windows, and full-image shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsss_ray.eval.zero_shot import (
    _windows,
    chain_assignments,
    group_class_affinity,
    pixel_scores,
    with_background,
)


def test_chain_is_the_product_of_soft_assignments():
    g = torch.Generator().manual_seed(0)
    a1 = torch.randn(2, 6, 16, generator=g).softmax(1)  # B x K1 x N, softmax over groups
    a2 = torch.randn(2, 3, 6, generator=g).softmax(1)  # B x K2 x K1
    chain = chain_assignments([{"attn_soft": a1}, {"attn_soft": a2}])
    assert chain.shape == (2, 16, 3)
    want = torch.einsum("bkn,bjk->bnj", a1, a2)
    torch.testing.assert_close(chain, want)
    torch.testing.assert_close(chain.sum(-1), torch.ones(2, 16))  # still a distribution


def test_affinity_restricts_to_topk_and_multiplies_unrestricted_softmax():
    text = torch.eye(4)  # class c = axis c
    groups = torch.tensor([[[1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 0.2, 0, 1.0]]])  # B=1, G=3
    image = torch.tensor([[1.0, 0.1, 0.9, 0.0]])  # top-2 classes: 0 and 2
    aff = group_class_affinity(groups, image, text, logit_scale=10.0, topk=2)
    assert aff.shape == (1, 3, 4)
    assert torch.all(aff[0, :, [1, 3]] == 0)  # outside the top-2: zero
    assert aff[0, 0].argmax() == 0 and aff[0, 1].argmax() == 2
    full = (10.0 * F.normalize(groups, dim=-1) @ text.t()).softmax(-1)
    restricted = (10.0 * F.normalize(groups, dim=-1) @ text.t())[..., [0, 2]].softmax(-1)
    torch.testing.assert_close(aff[..., [0, 2]], restricted * full[..., [0, 2]])
    everything = group_class_affinity(groups, image, text, logit_scale=10.0, topk=0)
    torch.testing.assert_close(everything, full * full)  # no restriction


def test_pixel_scores_and_background_threshold():
    # a 2 x 2 token grid, 2 groups: left column -> group 0, right column -> group 1
    chain = torch.tensor([[[0.9, 0.1], [0.2, 0.8], [0.9, 0.1], [0.2, 0.8]]])
    aff = torch.tensor([[[0.97, 0.01, 0.0], [0.0, 0.5, 0.3]]])  # group 0 sure, group 1 unsure
    scores, groups = pixel_scores(chain, (2, 2), aff, (4, 6))
    assert scores.shape == (1, 3, 4, 6) and groups.shape == (1, 4, 6)
    assert torch.all(groups[0, :, :3] == 0) and torch.all(groups[0, :, 3:] == 1)
    torch.testing.assert_close(scores[0, :, 0, 0], aff[0, 0])
    labels = with_background(scores, aff, 0.95).argmax(1)[0]
    assert torch.all(labels[:, :3] == 1)  # class index 0 + 1 (background is 0)
    assert torch.all(labels[:, 3:] == 0)  # max 0.5 < min(0.95, 0.97): background
    labels = with_background(scores, aff, 0.4).argmax(1)[0]
    assert torch.all(labels[:, 3:] == 2)


def test_background_rule_is_the_references_hand_computed():
    """GroupViT: t = min(bg_thresh, max affinity) per window, a 0/1 channel. VOC's 0.95 with a
    best group at 0.90: t = 0.90, so that group stays foreground (a constant 0.95 channel would
    have made the whole window background); the unsure group (0.5 < 0.90) is background."""
    chain = torch.tensor([[[0.9, 0.1], [0.2, 0.8], [0.9, 0.1], [0.2, 0.8]]])
    aff = torch.tensor([[[0.90, 0.05, 0.0], [0.0, 0.5, 0.3]]])
    scores, _ = pixel_scores(chain, (2, 2), aff, (2, 2))
    out = with_background(scores, aff, 0.95)
    assert out[0, 0].tolist() == [[0.0, 1.0], [0.0, 1.0]]  # exactly 0/1
    assert out.argmax(1)[0].tolist() == [[1, 0], [1, 0]]
    assert with_background(scores, aff, 0.4).argmax(1)[0].tolist() == [[1, 2], [1, 2]]


def test_sliding_windows_average_the_background_channel(monkeypatch):
    """mmseg's slide_inference averages the per-window outputs: a pixel background in one of
    its two windows has background 0.5 and keeps a class scoring 0.6 in both."""
    from wsss_ray.eval.zero_shot import ZeroShotSegmenter

    seg = ZeroShotSegmenter.__new__(ZeroShotSegmenter)
    seg.class_names, seg.device = ["background", "a"], torch.device("cpu")
    seg.short_side, seg.max_long_side, seg.window, seg.stride = 64, 0, 64, 32
    seg.mean, seg.std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    seg.model = torch.nn.Linear(1, 1)

    def window_scores(crops):  # two windows: x in [0, 64) and [32, 96)
        assert crops.shape == (2, 3, 64, 64)
        s = torch.zeros(2, 2, 64, 64)
        s[0, 0], s[:, 1] = 1.0, 0.6  # window 0 calls everything background
        return s, torch.zeros(2, 64, 64, dtype=torch.long)

    monkeypatch.setattr(seg, "window_scores", window_scores)
    labels = seg.predict(np.zeros((64, 96, 3), np.uint8))
    assert np.all(labels[:, :32] == 0)  # background in its only window
    assert np.all(labels[:, 34:62] == 1)  # 0.5 background < 0.6 (away from resize edges)
    assert np.all(labels[:, 64:] == 1)


def test_rescale_as_mmcv_imrescale():
    from wsss_ray.eval.zero_shot import rescaled_size

    assert rescaled_size(375, 500, 448, 2048) == (448, 597)  # int(500 * 1.19467 + 0.5)
    assert rescaled_size(100, 1000, 448, 2048) == (205, 2048)  # the long side caps the scale
    assert rescaled_size(100, 1000, 448, 0) == (448, 4480)


def test_windows_cover_the_image_with_fixed_size():
    for h, w in [(448, 597), (448, 448), (300, 200), (64, 96)]:
        boxes = _windows(h, w, 448 if h >= 300 else 64, 224 if h >= 300 else 32)
        cover = np.zeros((h, w), int)
        sizes = set()
        for y1, y2, x1, x2 in boxes:
            cover[y1:y2, x1:x2] += 1
            sizes.add((y2 - y1, x2 - x1))
        assert cover.min() >= 1 and len(sizes) == 1
    assert len(_windows(448, 597, 448, 224)) == 2


def test_segmenter_shapes_and_threshold_extremes():
    from wsss_ray.data.synthetic import CLASS_NAMES, make_scene
    from wsss_ray.eval.zero_shot import ZeroShotSegmenter
    from wsss_ray.models.clip import tokenizer
    from wsss_ray.models.pgseg import PGSeg

    torch.manual_seed(0)
    model = PGSeg("tiny")
    tok = tokenizer("ViT-B-16", 32)
    image = make_scene(0, size=128).image[:, :100]  # non-square: 128 x 100
    for thresh, check in [(1.01, lambda y: np.any(y == 0)), (0.0, lambda y: np.all(y > 0))]:
        seg = ZeroShotSegmenter(
            model, CLASS_NAMES, tok, ["a photo of a {}."], 5, thresh, 80, 0, 64, 32
        )
        labels, groups = seg.predict(image, with_groups=True)
        assert labels.shape == (128, 100) and groups.shape == (128, 100)
        assert labels.max() < len(CLASS_NAMES) and check(labels)
    assert model.training  # predict restores the mode it found


def test_eval_loads_a_checkpoint_trained_without_npr(tmp_path):
    """npr.enabled=false pretraining has no reconstruction MLPs; evaluation must still load it
    (and keep refusing checkpoints that miss weights it does use)."""
    from wsss_ray.eval.pgseg import build_model
    from wsss_ray.models.pgseg import PGSeg

    torch.manual_seed(0)
    src = PGSeg("tiny")
    state = {k: v for k, v in src.state_dict().items() if ".recon." not in k}
    assert len(state) < len(src.state_dict())
    torch.save(state, tmp_path / "no_npr.pt")
    model = build_model("tiny", str(tmp_path / "no_npr.pt"))
    key = next(k for k in state if k.endswith("weight"))
    torch.testing.assert_close(model.state_dict()[key], state[key])
    del state[key]
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="1 missing"):
        build_model("tiny", str(tmp_path / "broken.pt"))


def test_pgseg_trains_and_evaluates_with_imagenet_statistics():
    """GroupViT/PGSeg normalise with ImageNet's mean/std in training and in zero-shot evaluation;
    CLIP pretraining keeps CLIP's. Hand-computed: a grey 128 pixel becomes (128/255 - mean)/std."""
    from wsss_ray.config import (
        CLIP_MEAN,
        IMAGENET_MEAN,
        IMAGENET_STD,
        ClipPretrainConfig,
        PGSegPretrainConfig,
        ZeroShotConfig,
    )
    from wsss_ray.eval.pgseg import segmenter_for
    from wsss_ray.models.pgseg import PGSeg

    assert PGSegPretrainConfig().data.mean == IMAGENET_MEAN == [0.485, 0.456, 0.406]
    assert PGSegPretrainConfig().data.std == IMAGENET_STD == [0.229, 0.224, 0.225]
    assert ClipPretrainConfig().data.mean == CLIP_MEAN
    model = PGSeg("tiny").eval()
    seen = []
    encode = model.encode_image
    model.encode_image = lambda x: seen.append(x.clone()) or encode(x)
    names = ["background", "circle", "square"]
    image = np.full((64, 64, 3), 128, np.uint8)
    zs = ZeroShotConfig(short_side=64, window=64, stride=32)
    segmenter_for(model, "tiny", names, zs, 0.5).predict(image)  # the eval job's default
    want = [(128 / 255 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    torch.testing.assert_close(seen[-1][0, :, 0, 0], torch.tensor(want), atol=1e-5, rtol=0)
    # periodic validation passes the run's own data.mean/std
    segmenter_for(model, "tiny", names, zs, 0.5, mean=CLIP_MEAN, std=[0.5, 0.5, 0.5]).predict(image)
    want = [(128 / 255 - m) / 0.5 for m in CLIP_MEAN]
    torch.testing.assert_close(seen[-1][0, :, 0, 0], torch.tensor(want), atol=1e-5, rtol=0)
