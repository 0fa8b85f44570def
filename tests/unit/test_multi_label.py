"""GroupViT's multi-label (noun prompt) loss: the loss against GroupViT's formula written out,
across two workers, the noun prompts, the decoder's token layout and the task's forward."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from _dist import spawn_gloo

from wsss_ray.data.nouns import caption_words, imagenet_templates, noun_prompts
from wsss_ray.losses.multi_label import MultiLabelLoss


def _groupvit_multi_label(image_BD, text_BND, log_scale):
    """GroupViT's multi_label_loss on one worker (world 1, rank 0): soft targets, 1/L2 per own
    prompt for an image row, 1 on the own image for a prompt row; timm SoftTargetCrossEntropy."""
    image = F.normalize(image_BD, dim=-1).unsqueeze(1)  # B x 1 x C
    text = F.normalize(text_BND, dim=-1)  # B x L2 x C
    b, l2 = text.shape[:2]
    s = log_scale.exp().clamp(max=100)
    image_x, text_x = image.reshape(b, -1), text.reshape(b * l2, -1)
    labels_img = torch.zeros(b, b, l2)
    labels_txt = torch.zeros(b, l2, b)
    for i in range(b):
        labels_img[i, i, :] = 1.0 / l2
        labels_txt[i, :, i] = 1.0
    labels_img, labels_txt = labels_img.reshape(b, b * l2), labels_txt.reshape(b * l2, b)

    def soft_ce(logits, target):
        return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()

    return 0.5 * (
        soft_ce(image_x @ text_x.t() * s, labels_img)
        + soft_ce(text_x @ image_x.t() * s, labels_txt)
    )


def test_multi_label_loss_equals_groupvits_formula():
    g = torch.Generator().manual_seed(0)
    image, prompts = torch.randn(6, 16, generator=g), torch.randn(6, 3, 16, generator=g)
    log_scale = torch.full((1,), math.log(1 / 0.07))
    ours = MultiLabelLoss()(image, prompts, log_scale)
    torch.testing.assert_close(ours, _groupvit_multi_label(image, prompts, log_scale))
    matched = prompts.clone()
    matched[:] = image.unsqueeze(1)  # every prompt equals its own image: a lower loss
    assert MultiLabelLoss()(image, matched, log_scale) < ours


def _worker(rank, out):
    g = torch.Generator().manual_seed(0)
    image, prompts = torch.randn(8, 16, generator=g), torch.randn(8, 3, 16, generator=g)
    mine = slice(4 * rank, 4 * rank + 4)
    img = image[mine].clone().requires_grad_(True)
    loss = MultiLabelLoss()(img, prompts[mine], torch.full((1,), 2.0))
    loss.backward()
    out[rank] = (loss.item(), img.grad.clone())


def test_multi_label_loss_on_two_workers_is_the_global_loss():
    out = spawn_gloo(_worker, 2)
    g = torch.Generator().manual_seed(0)
    image, prompts = torch.randn(8, 16, generator=g), torch.randn(8, 3, 16, generator=g)
    image.requires_grad_(True)
    ref = _groupvit_multi_label(image, prompts, torch.full((1,), 2.0))
    ref.backward()
    assert math.isclose((out[0][0] + out[1][0]) / 2, ref.item(), rel_tol=1e-5)
    # gathered with gradient: each worker's gradient is its half of the global gradient x 2
    grads = torch.cat([out[0][1], out[1][1]]) / 2
    torch.testing.assert_close(grads, image.grad, atol=1e-6, rtol=1e-4)


def test_noun_prompts_as_groupvit_builds_them():
    templates = imagenet_templates()
    assert len(templates) == 80 and templates[0] == "a bad photo of a {}."
    rng = np.random.default_rng(0)
    caption = "a red circle next to the green square"
    words = caption_words(caption, "words")
    assert words == ["red", "circle", "green", "square"]
    out = noun_prompts(caption, 3, rng, templates, "words")
    assert out[0] == caption and len(out) == 4
    used = [w for w in words for p in out[1:] if f" {w}" in p or p.startswith(w)]
    assert len(set(used)) == 3  # three distinct words, each in a template
    assert noun_prompts("on it", 2, rng, templates, "words") == ["on it"] * 3  # padded


def test_decoder_emits_caption_and_prompt_tokens(tmp_path):
    import io

    from PIL import Image

    from wsss_ray.data.webdataset import ImageTextDecoder

    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buf, format="JPEG")
    batch = {
        "__key__": np.array(["a", "b"]),
        "jpg": np.array([buf.getvalue()] * 2, dtype=object),
        "txt": np.array([b"a red circle", b"two blue stars"], dtype=object),
    }
    dec = ImageTextDecoder("ViT-B-16", 16, (0.5, 1.0), True, 0, 32, multi_label=2,
                           noun_tagger="words")  # fmt: skip
    out = dec(batch)
    assert out["text"].shape == (2, 3, 32) and out["image"].shape[0] == 2
    plain = ImageTextDecoder("ViT-B-16", 16, (0.5, 1.0), True, 0, 32)(batch)
    assert np.array_equal(out["text"][:, 0], plain["text"])  # the caption comes first


def test_pgseg_task_adds_the_multi_label_loss():
    from wsss_ray.config import PGSegPretrainConfig, load_config
    from wsss_ray.tasks import build_task

    cfg = load_config(
        PGSegPretrainConfig,
        "configs/pgseg/tiny.yaml",
        ["model.size=tiny", "loss.multi_label=3", "loss.noun_tagger=words"],
    )
    task = build_task(cfg)
    tokens = torch.zeros(4, 4, 32, dtype=torch.long)
    tokens[..., 0], tokens[..., 1:5] = 49406, torch.randint(1, 49000, (4, 4, 4))
    tokens[..., 5] = 49407
    losses, metrics = task.training_forward({"image": torch.randn(4, 3, 64, 64), "text": tokens})
    assert "multi_label_loss" in losses and torch.isfinite(losses["multi_label_loss"])
    sum(losses.values()).backward()
    assert task.model.multi_label_logit_scale.grad is not None
    assert "multi_label_logit_scale" in task.model.state_dict()


def test_nltk_tagger_without_its_data_is_a_config_error():
    import pytest

    from wsss_ray.config import ConfigError, PGSegPretrainConfig, load_config
    from wsss_ray.data.nouns import nltk_ready
    from wsss_ray.tasks import check_config

    if not nltk_ready():
        pytest.skip("nltk and its tagger data are installed here")
    cfg = load_config(
        PGSegPretrainConfig, "configs/pgseg/tiny.yaml", ["loss.multi_label=3"]
    )  # noun_tagger: nltk, GroupViT's
    with pytest.raises(ConfigError, match=r"loss\.noun_tagger: nltk .* or loss.noun_tagger=words"):
        check_config(cfg)
