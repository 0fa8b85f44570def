"""The frozen dense CLIP and the VPL model side: dense features equal open_clip's own tokens,
position embeddings interpolate, GradCAM takes gradients through the last block, prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsss_ray.data import synthetic as syn
from wsss_ray.data.text import VOC_BACKGROUND, class_prompts, text_prototypes
from wsss_ray.data.voc import VOC_CLASSES
from wsss_ray.models.clip import DenseCLIP, create_clip, load_frozen_clip, tokenizer


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    torch.manual_seed(0)
    model = create_clip("wsss-tiny")
    path = tmp_path_factory.mktemp("w") / "tiny.pt"
    state = model.state_dict()
    state["logit_scale"] = state["logit_scale"].reshape(())  # as open_clip saves it
    torch.save(state, path)
    return str(path), model


def test_dense_features_match_open_clip_tokens(tiny_file):
    path, ref = tiny_file
    clip = load_frozen_clip("wsss-tiny", path)
    assert not any(p.requires_grad for p in clip.parameters())
    dense = DenseCLIP(clip)
    x = torch.randn(2, 3, 64, 64)
    out = dense(x, attn_layers=2)
    visual = ref.visual.eval()
    visual.output_tokens = True
    with torch.no_grad():
        _, tokens = visual(x)
    assert out["grid"] == (8, 8)
    torch.testing.assert_close(out["patch_feats"], tokens @ visual.proj, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["image_feat"], (tokens @ visual.proj).mean(1))
    attn = out["attn"]
    assert attn.shape == (2, 2, 64, 64) and bool((attn >= 0).all())
    # patch-to-patch rows of a softmax over (class + patches): each sums to <= 1
    assert float(attn.sum(-1).max()) <= 1 + 1e-5


def test_any_patch_multiple_input_size(tiny_file):
    dense = DenseCLIP(load_frozen_clip("wsss-tiny", tiny_file[0]))
    out = dense(torch.randn(1, 3, 96, 40))
    assert out["grid"] == (12, 5) and out["patch_feats"].shape == (1, 60, 128)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        dense(torch.randn(1, 3, 90, 40))


def test_gradcam_activations_are_in_the_graph(tiny_file):
    dense = DenseCLIP(load_frozen_clip("wsss-tiny", tiny_file[0]))
    out = dense(torch.randn(1, 3, 64, 64), cam=True)
    assert out["ln1"].shape == (1, 64, 128) and out["ln1"].requires_grad
    (g,) = torch.autograd.grad(out["image_feat"].sum(), out["ln1"])
    assert g.shape == out["ln1"].shape and float(g.abs().sum()) > 0


def test_missing_weights_give_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="CLIP weights not found"):
        load_frozen_clip("ViT-B-16", str(tmp_path / "ViT-B-16.pt"))
    with pytest.raises(FileNotFoundError, match="clip.weights"):
        load_frozen_clip("ViT-B-16", "")


def test_prompts_follow_the_dataset():
    fg, bg = class_prompts(VOC_CLASSES)
    assert len(fg) == 20 and fg[14] == "person with clothes,people,human"  # CLIP-ES verbatim
    assert bg == VOC_BACKGROUND and len(bg) == 25
    from wsss_ray.data.coco import COCO_CLASSES

    fg, bg = class_prompts(COCO_CLASSES)
    assert len(fg) == 80 and len(bg) == 23 and "keyboard" not in bg
    # CLIP-ES's names in COCO order: VOC-style names where COCO's differ, its synonyms
    pairs = dict(zip(COCO_CLASSES[1:], fg))
    assert pairs["airplane"] == "aeroplane" and pairs["couch"] == "sofa"
    assert pairs["tv"] == "tvmonitor screen" and pairs["baseball glove"] == "glove"
    assert pairs["hair drier"] == "hairdrier,blowdrier" and pairs["snowboard"] == "snowboard"
    assert class_prompts(COCO_CLASSES, reference_typos=True)[0][31] == "sknowboard"
    fg, bg = class_prompts(syn.CLASS_NAMES)
    assert fg == syn.SHAPES


def test_text_prototypes_average_templates(tiny_file):
    _, model = tiny_file
    tok = tokenizer("wsss-tiny", 32)
    z = text_prototypes(model, tok, ["circle", "star"], ["a {}.", "a photo of a {}."])
    assert z.shape == (2, 128)
    np.testing.assert_allclose(z.norm(dim=-1).numpy(), 1.0, atol=1e-5)
    with torch.no_grad():
        e = torch.nn.functional.normalize(
            model.encode_text(tok(["a circle.", "a photo of a circle."])), dim=-1
        )
    ref = torch.nn.functional.normalize(e.mean(0), dim=-1)
    torch.testing.assert_close(z[0], ref, atol=1e-5, rtol=1e-4)
