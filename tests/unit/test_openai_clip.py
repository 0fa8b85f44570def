"""OpenAI-format CLIP ViT-B/16 weights (the format of OpenAI's released ``ViT-B-16.pt``: a
TorchScript archive of fp16 weights, or the same state dict saved plainly) load through the VPL
config and give the image and text features of an independent QuickGELU computation written
here from the published architecture (Radford et al. 2021; OpenAI ``clip/model.py``): pre-LN
residual blocks with ``x * sigmoid(1.702 x)`` in the MLP, a class token, ``ln_post`` on it and
``proj``; the text tower with a causal mask, ``ln_final`` and the EOT token (the largest id)
projected by ``text_projection``. Random weights, written by the test; nothing is downloaded.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from wsss_ray.config import ConfigError, VPLConfig, load_config
from wsss_ray.eval.vpl import frozen_clip
from wsss_ray.models.clip import is_torchscript_archive, load_frozen_clip, read_clip_weights

WIDTH, LAYERS, HEADS, PATCH, SIDE = 768, 12, 12, 16, 224
T_WIDTH, T_LAYERS, T_HEADS, CTX, VOCAB, EMBED = 512, 12, 8, 77, 49408, 512


def _blocks(prefix: str, width: int, layers: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    def r(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    out = {}
    for i in range(layers):
        p = f"{prefix}.resblocks.{i}."
        out |= {
            p + "attn.in_proj_weight": r(3 * width, width, std=width**-0.5),
            p + "attn.in_proj_bias": r(3 * width),
            p + "attn.out_proj.weight": r(width, width, std=width**-0.5),
            p + "attn.out_proj.bias": r(width),
            p + "ln_1.weight": 1 + r(width, std=0.1),
            p + "ln_1.bias": r(width),
            p + "mlp.c_fc.weight": r(4 * width, width, std=width**-0.5),
            p + "mlp.c_fc.bias": r(4 * width),
            p + "mlp.c_proj.weight": r(width, 4 * width, std=(4 * width) ** -0.5),
            p + "mlp.c_proj.bias": r(width),
            p + "ln_2.weight": 1 + r(width, std=0.1),
            p + "ln_2.bias": r(width),
        }
    return out


def openai_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ViT-B/16 weights under OpenAI's names, fp16 as released, with its extra keys."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    grid = SIDE // PATCH
    sd = {
        "visual.class_embedding": r(WIDTH, std=WIDTH**-0.5),
        "visual.positional_embedding": r(grid * grid + 1, WIDTH, std=WIDTH**-0.5),
        "visual.proj": r(WIDTH, EMBED, std=WIDTH**-0.5),
        "visual.conv1.weight": r(WIDTH, 3, PATCH, PATCH, std=(3 * PATCH * PATCH) ** -0.5),
        "visual.ln_pre.weight": 1 + r(WIDTH, std=0.1),
        "visual.ln_pre.bias": r(WIDTH),
        "visual.ln_post.weight": 1 + r(WIDTH, std=0.1),
        "visual.ln_post.bias": r(WIDTH),
        "positional_embedding": r(CTX, T_WIDTH, std=0.01),
        "text_projection": r(T_WIDTH, EMBED, std=T_WIDTH**-0.5),
        "logit_scale": torch.tensor(math.log(1 / 0.07)),
        "token_embedding.weight": r(VOCAB, T_WIDTH),
        "ln_final.weight": 1 + r(T_WIDTH, std=0.1),
        "ln_final.bias": r(T_WIDTH),
    }
    sd |= _blocks("visual.transformer", WIDTH, LAYERS, g)
    sd |= _blocks("transformer", T_WIDTH, T_LAYERS, g)
    sd = {k: v.half() for k, v in sd.items()}
    sd |= {
        "input_resolution": torch.tensor(SIDE),
        "context_length": torch.tensor(CTX),
        "vocab_size": torch.tensor(VOCAB),
    }
    return sd


class _Node(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def save_torchscript(sd: dict[str, torch.Tensor], path) -> None:
    """A TorchScript archive whose ``state_dict()`` is ``sd`` (a module tree of the names)."""
    top = _Node()
    for key, value in sd.items():
        *path_, leaf = key.split(".")
        m = top
        for p in path_:
            if p not in m._modules:
                m.add_module(p, _Node())
            m = m._modules[p]
        if value.is_floating_point():
            m.register_parameter(leaf, nn.Parameter(value, requires_grad=False))
        else:
            m.register_buffer(leaf, value)
    torch.jit.save(torch.jit.script(top), str(path))


# --------------------------------------------------------------- the independent computation
def _ln(x, sd, p):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"])


def _tower(x, sd, prefix, layers, heads, causal):
    n, d = x.shape[1], x.shape[2]
    mask = torch.full((n, n), float("-inf")).triu(1) if causal else torch.zeros(n, n)
    for i in range(layers):
        p = f"{prefix}.resblocks.{i}."
        h = _ln(x, sd, p + "ln_1")
        qkv = h @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]
        q, k, v = (t.unflatten(-1, (heads, d // heads)).transpose(1, 2) for t in qkv.chunk(3, -1))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads) + mask, -1)
        o = (a @ v).transpose(1, 2).flatten(2)
        x = x + o @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
        h = _ln(x, sd, p + "ln_2") @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"]
        h = h * torch.sigmoid(1.702 * h)  # QuickGELU
        x = x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
    return x


def ref_image(sd, images):
    x = torch.nn.functional.conv2d(images, sd["visual.conv1.weight"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], 1) + sd["visual.positional_embedding"]
    x = _tower(_ln(x, sd, "visual.ln_pre"), sd, "visual.transformer", LAYERS, HEADS, False)
    return _ln(x[:, 0], sd, "visual.ln_post") @ sd["visual.proj"]


def ref_text(sd, tokens):
    x = sd["token_embedding.weight"][tokens] + sd["positional_embedding"]
    x = _ln(_tower(x, sd, "transformer", T_LAYERS, T_HEADS, True), sd, "ln_final")
    return x[torch.arange(len(tokens)), tokens.argmax(-1)] @ sd["text_projection"]


# ------------------------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("openai")
    sd = openai_state()
    save_torchscript(sd, folder / "ViT-B-16.pt")
    torch.save(sd, folder / "ViT-B-16_state_dict.pt")
    ref = {k: v.float() for k, v in sd.items() if v.is_floating_point()}
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, SIDE, SIDE, generator=g)
    from wsss_ray.models.clip import tokenizer

    tokens = tokenizer("ViT-B-16-quickgelu", CTX)(["a photo of a cat.", "an aeroplane"])
    with torch.no_grad():
        expected = ref_image(ref, images), ref_text(ref, tokens)
    return folder, images, tokens, expected


def _features(model, images, tokens):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


@pytest.mark.parametrize("file", ["ViT-B-16.pt", "ViT-B-16_state_dict.pt"])
def test_openai_weights_through_the_vpl_config_equal_quickgelu(weights, file):
    folder, images, tokens, (img_ref, txt_ref) = weights
    path = folder / file
    assert is_torchscript_archive(path) == (file == "ViT-B-16.pt")
    cfg = load_config(VPLConfig, None, [f"clip.weights={path}"])  # the default clip.name
    assert cfg.clip.name == "ViT-B-16-quickgelu"
    model = frozen_clip(cfg.clip.name, cfg.clip.weights, cfg.clip.origin)
    img, txt = _features(model, images, tokens)
    assert img.dtype == torch.float32 and img.shape == (2, EMBED) and txt.shape == (2, EMBED)
    torch.testing.assert_close(img, img_ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(txt, txt_ref, atol=1e-4, rtol=0)
    _, origin = read_clip_weights(str(path))
    assert origin == "openai"


def test_openai_weights_into_a_gelu_model_are_refused(weights, tmp_path):
    folder, images, tokens, (img_ref, _) = weights
    jit, plain = folder / "ViT-B-16.pt", folder / "ViT-B-16_state_dict.pt"
    # the config check catches the archive before any cluster work
    with pytest.raises(
        ConfigError, match=r"clip\.name: .*QuickGELU.*clip\.name=ViT-B-16-quickgelu"
    ):
        load_config(VPLConfig, None, [f"clip.weights={jit}", "clip.name=ViT-B-16"])
    # the loader catches both files (the state dict by OpenAI's extra keys)
    for path in (jit, plain):
        with pytest.raises(ValueError, match="QuickGELU"):
            load_frozen_clip("ViT-B-16", str(path))
    # a state dict without the extra keys: declared with clip.origin=openai
    sd = {k: v for k, v in torch.load(plain, weights_only=True).items() if v.is_floating_point()}
    torch.save(sd, tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="QuickGELU"):
        load_frozen_clip("ViT-B-16", str(tmp_path / "bare.pt"), origin="openai")
    # and what the check prevents: the same weights in GELU differ far beyond the tolerance
    gelu = load_frozen_clip("ViT-B-16", str(tmp_path / "bare.pt"), origin="other")
    img, _ = _features(gelu, images, tokens)
    assert (img - img_ref).abs().max() > 1e-2


def test_weights_of_another_architecture_name_the_mismatch(weights):
    folder = weights[0]
    with pytest.raises(ValueError, match="does not fit clip.name=ViT-B-32-quickgelu"):
        load_frozen_clip("ViT-B-32-quickgelu", str(folder / "ViT-B-16.pt"))
