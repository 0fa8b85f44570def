"""VPL phase 2 pieces without Ray: the training augmentation (label/image alignment, padding
with ignore, scale range), the decode actor's columns, multi-scale + flip prediction against a
direct computation, the poly schedule, and the config errors users get before anything starts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from wsss_ray.config import ConfigError, VPLEvalConfig, VPLTrainConfig, load_config
from wsss_ray.data.seg_train import PseudoLabelDecoder, augment
from wsss_ray.train.schedule import warmup_poly


def _coded_image(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """An image whose red channel equals its label * 40 in 4 vertical bands: alignment after
    any crop/flip/nearest-resize can be read back pixel by pixel."""
    label = np.zeros((h, w), np.uint8)
    for k in range(4):
        label[:, k * w // 4 : (k + 1) * w // 4] = k + 1
    image = np.zeros((h, w, 3), np.uint8)
    image[..., 0] = label * 40
    return image, label


def test_augment_keeps_image_and_label_aligned():
    image, label = _coded_image(60, 80)
    rng = np.random.default_rng(0)
    flips = 0
    for _ in range(20):
        img, lab = augment(image, label, 48, (0.5, 2.0), True, rng)
        assert img.shape == (48, 48, 3) and lab.shape == (48, 48)
        valid = lab != 255
        # bilinear blends at band edges: compare away from them (the label changes there)
        inner = valid.copy()
        inner[:, 1:] &= lab[:, 1:] == lab[:, :-1]
        inner[:, :-1] &= lab[:, :-1] == lab[:, 1:]
        assert np.abs(img[..., 0][inner].astype(int) - 40 * lab[inner].astype(int)).max() <= 1
        row = lab[valid.all(1)][0] if valid.all(1).any() else None
        if row is not None and row[0] > row[-1]:
            flips += 1
    assert 0 < flips < 20  # flips happen, not always


def test_augment_pads_small_images_with_ignore_and_mean_colour():
    image, label = _coded_image(20, 24)
    img, lab = augment(image, label, 64, (1.0, 1.0), False, np.random.default_rng(1), (7, 8, 9))
    assert lab.shape == (64, 64)
    assert (lab == 255).sum() == 64 * 64 - 20 * 24  # everything outside the image is ignore
    assert (img[lab == 255] == (7, 8, 9)).all()
    assert set(np.unique(lab[lab != 255])) == {1, 2, 3, 4}


def test_augment_scale_range_changes_content_size():
    image, label = _coded_image(64, 64)
    rng = np.random.default_rng(2)
    # at scale 2 a 32-crop sees at most 2 bands (bands are 32 px wide after scaling)
    for _ in range(5):
        _, lab = augment(image, label, 32, (2.0, 2.0), False, rng)
        assert len(set(np.unique(lab)) - {255}) <= 2
    # at scale 0.5 the whole image (32 px) fits a 32-crop: all 4 bands, no ignore
    _, lab = augment(image, label, 32, (0.5, 0.5), False, rng)
    assert set(np.unique(lab)) == {1, 2, 3, 4}


def test_decoder_actor_columns(tmp_path):
    image, label = _coded_image(40, 40)
    gt = label.copy()
    gt[:, :20] = 0  # the image-level labels come from the ground truth: classes 3 and 4
    Image.fromarray(image).save(tmp_path / "a.jpg")
    Image.fromarray(label, mode="L").save(tmp_path / "a.png")
    Image.fromarray(gt, mode="L").save(tmp_path / "gt.png")
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    dec = PseudoLabelDecoder(
        num_classes=6, crop=32, scale_range=(1.0, 1.0), hflip=True, mean=[0.5] * 3
    )
    out = dec(
        {
            "image_path": np.array([str(tmp_path / "a.jpg"), str(tmp_path / "bad.jpg")]),
            "label_path": np.array([str(tmp_path / "a.png")] * 2),
            "mask_path": np.array([str(tmp_path / "gt.png")] * 2),
        }
    )
    assert out["image"].shape == (1, 32, 32, 3) and out["image"].dtype == np.uint8
    assert out["label"].shape == (1, 32, 32) and out["label"].dtype == np.int64
    assert out["present"].tolist() == [[1, 0, 0, 1, 1, 0]]
    assert out["skipped"].sum() == 1  # the bad JPEG is skipped and counted


def test_warmup_poly_endpoints():
    f = warmup_poly(lr=1e-3, warmup_start_lr=1e-6, warmup_steps=10, total_steps=110, power=0.9)
    assert f(0) == pytest.approx(1e-3)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5**0.9)
    assert f(110) == 0.0


class _ToyDense(torch.nn.Module):
    """A stand-in for DenseCLIP: 2 'blocks' of 4-px patch tokens (mean colour per patch)."""

    patch = 4

    def forward(self, images, tokens=False):
        b, c, h, w = images.shape
        x = torch.nn.functional.avg_pool2d(images, 4)  # B x 3 x h x w
        t = x.flatten(2).transpose(1, 2)  # B x N x 3
        return {"tokens": torch.stack([t, 2 * t]), "grid": (h // 4, w // 4)}


class _ToyDecoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3, 3))

    def forward(self, tokens, grid):
        t = tokens.sum(0) @ self.w  # B x N x 3
        return {"logits": t.transpose(1, 2).reshape(t.shape[0], 3, *grid)}


def test_predict_probs_averages_scales_and_flips():
    from wsss_ray.tasks.vpl import predict_probs

    torch.manual_seed(0)
    dense, dec = _ToyDense(), _ToyDecoder()
    image = torch.randn(1, 3, 16, 24)
    got = predict_probs(dense, dec, image, [1.0, 0.5], flip=True)
    assert got.shape == (3, 16, 24)
    torch.testing.assert_close(got.sum(0), torch.ones(16, 24))

    def one(x):
        out = dense(x)
        logits = dec(out["tokens"], out["grid"])["logits"]
        return torch.nn.functional.interpolate(logits, (16, 24), mode="bilinear").softmax(1)[0]

    half = torch.nn.functional.interpolate(image, (8, 12), mode="bilinear")
    want = (one(image) + one(image.flip(-1)).flip(-1) + one(half) + one(half.flip(-1)).flip(-1)) / 4
    torch.testing.assert_close(got, want)


def test_predict_probs_weclip_protocol():
    """WeCLIP test_msc_flip_voc.py: long side to 512 (here 40), per scale the flip-averaged
    logits resized to the scale-1 decoder grid, averaged as logits, upsampled, softmax."""
    from wsss_ray.tasks.vpl import predict_probs

    torch.manual_seed(0)
    dense, dec = _ToyDense(), _ToyDecoder()
    image = torch.randn(1, 3, 15, 30)  # long side 30 -> 60: 30 x 60
    got = predict_probs(dense, dec, image, [1.0, 0.75], True, "weclip", 60)
    interp = torch.nn.functional.interpolate

    def logits(x):
        x = x[..., : x.shape[-2] // 4 * 4, : x.shape[-1] // 4 * 4]  # the ViT's stride cuts
        out = dense(x)
        return dec(out["tokens"], out["grid"])["logits"][0]

    base = interp(image, size=(30, 60), mode="bilinear", align_corners=False)
    s1 = (logits(base) + logits(base.flip(-1)).flip(-1)) / 2  # 28 x 60 seen: grid 7 x 15
    small = interp(base, scale_factor=0.75, mode="bilinear", align_corners=False)  # 22 x 45
    a = interp(logits(small)[None], size=(7, 15), mode="bilinear", align_corners=False)[0]
    b = interp(logits(small.flip(-1))[None], size=(7, 15), mode="bilinear")[0].flip(-1)
    mean = (s1 + (a + b) / 2) / 2
    want = interp(mean[None], size=(15, 30), mode="bilinear", align_corners=False)[0].softmax(0)
    torch.testing.assert_close(got, want)


def test_vpl_train_config_errors_name_the_key(tmp_path):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"x")
    (tmp_path / "vpl" / "pseudo_labels_vision").mkdir(parents=True)
    base = [f"clip.weights={weights}", f"run.output_dir={tmp_path}", "train.max_steps=1"]
    with pytest.raises(ConfigError, match="phase1.prototypes: no prototypes file"):
        load_config(VPLTrainConfig, None, base)
    cfg = load_config(VPLTrainConfig, None, [*base, "rsc.weight=0"])
    assert cfg.task == "vpl_seg" and cfg.data.crop_size == 320
    with pytest.raises(ConfigError, match="phase1.labels: no pseudo-label folder"):
        load_config(VPLTrainConfig, None, [*base, "rsc.weight=0", "phase1.labels=text"])
    with pytest.raises(ConfigError, match="decoder.heads"):
        load_config(VPLTrainConfig, None, [*base, "rsc.weight=0", "decoder.heads=7"])
    with pytest.raises(ConfigError, match="optim.schedule"):
        load_config(VPLTrainConfig, None, [*base, "rsc.weight=0", "optim.schedule=step"])
    with pytest.raises(ConfigError, match="data.scale_range"):
        load_config(VPLTrainConfig, None, [*base, "rsc.weight=0", "data.scale_range=[2,1]"])
    with pytest.raises(ConfigError, match="checkpoint: give"):
        load_config(VPLEvalConfig, None, [f"clip.weights={weights}"])
    with pytest.raises(ConfigError, match="test.scales"):
        load_config(
            VPLEvalConfig,
            None,
            [f"clip.weights={weights}", f"checkpoint={weights}", "test.scales=[]"],
        )


def test_crop_must_be_a_patch_multiple(tmp_path):
    from wsss_ray.tasks import check_config

    weights = tmp_path / "w.pt"
    weights.write_bytes(b"x")
    (tmp_path / "vpl" / "pseudo_labels_vision").mkdir(parents=True)
    cfg = load_config(
        VPLTrainConfig,
        None,
        [f"clip.weights={weights}", f"run.output_dir={tmp_path}", "train.max_steps=1"]
        + ["rsc.weight=0", "clip.name=wsss-tiny", "data.crop_size=100"],
    )
    with pytest.raises(ConfigError, match="data.crop_size: 100 is not a multiple of"):
        check_config(cfg)
