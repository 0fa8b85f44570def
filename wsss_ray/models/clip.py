"""open_clip models by name, plus the project's registered CPU-sized architecture.

open_clip already builds every CLIP variant; we only register ``wsss-tiny`` (a 64-px ViT with a
4-layer text tower that trains on a laptop CPU in seconds) and make the logit scale a 1-element
tensor, because DeepSpeed cannot broadcast 0-d parameters.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import open_clip
import torch
from torch import nn

_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(_CONFIG_DIR)

TINY = "wsss-tiny"


def architectures() -> list[str]:
    return open_clip.list_models()


def model_config(name: str) -> dict:
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise KeyError(f"unknown open_clip architecture '{name}' (see open_clip.list_models())")
    return cfg


def image_size(name: str) -> int:
    size = model_config(name)["vision_cfg"].get("image_size", 224)
    return size if isinstance(size, int) else int(size[0])


def context_length(name: str) -> int:
    return int(model_config(name).get("text_cfg", {}).get("context_length", 77))


def create_clip(name: str, pretrained: str = "", init_logit_scale: float = 1 / 0.07) -> nn.Module:
    """An open_clip CLIP with a 1-element logit scale; ``pretrained`` is a local file or ''."""
    if pretrained and not os.path.isfile(pretrained):
        raise FileNotFoundError(f"CLIP weights file not found: {pretrained}")
    model = open_clip.create_model(name, pretrained=pretrained or None, device="cpu")
    scale = model.logit_scale.detach().reshape(1)
    if not pretrained:
        scale = torch.full((1,), math.log(init_logit_scale))
    model.logit_scale = nn.Parameter(scale)
    return model


def tokenizer(name: str, context_length: int | None = None):
    """open_clip's BPE tokenizer for ``name`` (bundled vocabulary; no download)."""
    return open_clip.get_tokenizer(name, context_length=context_length)


# ----------------------------------------------------------------------------- frozen dense CLIP
#: keys OpenAI's CLIP state dicts carry beside the weights (TorchScript attributes); open_clip
#: drops them too (``open_clip.factory.load_state_dict``)
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")

#: ``clip.origin`` choices
ORIGINS = ("auto", "openai", "other")


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """A TorchScript zip (``torch.jit.save``: a ``constants.pkl`` and a ``code/`` folder), the
    format of OpenAI's released ``ViT-B-16.pt``; ``torch.load(weights_only=True)`` refuses it."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def read_clip_weights(path: str) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict in a CLIP weights file and where it comes from: ``openai`` for a
    TorchScript archive or a state dict with OpenAI's extra keys, else ``unknown``. Reads
    TorchScript archives with ``torch.jit.load`` (parameters only are used), everything else
    with open_clip's reader (``weights_only=True``; ``.safetensors``, a ``state_dict`` entry and
    ``module.`` prefixes handled). The extra keys are dropped."""
    if is_torchscript_archive(path):
        import warnings

        with warnings.catch_warnings():  # "torch.jit.load is deprecated": the format is OpenAI's
            warnings.simplefilter("ignore", FutureWarning)
            state = dict(torch.jit.load(path, map_location="cpu").state_dict())
        origin = "openai"
    else:
        from open_clip.factory import load_state_dict

        state = dict(load_state_dict(path, weights_only=True))
        origin = "openai" if any(k in state for k in OPENAI_EXTRA_KEYS) else "unknown"
    for key in OPENAI_EXTRA_KEYS:
        state.pop(key, None)
    return state, origin


def uses_quick_gelu(name: str) -> bool:
    return bool(model_config(name).get("quick_gelu", False))


def check_activation(name: str, origin: str, source: str) -> None:
    """OpenAI's CLIPs use QuickGELU (x * sigmoid(1.702 x)); open_clip builds ``ViT-B-16`` with
    GELU and ``ViT-B-16-quickgelu`` with QuickGELU. Loading OpenAI weights into a GELU model
    changes every feature without failing, so it is an error here."""
    if origin == "openai" and not uses_quick_gelu(name):
        hint = f"{name}-quickgelu"
        fix = f"set clip.name={hint}" if hint in architectures() else "use a QuickGELU architecture"
        raise ValueError(
            f"{source} holds OpenAI CLIP weights (QuickGELU) but clip.name={name} is built with "
            f"GELU, which would change every feature: {fix}"
        )


def load_frozen_clip(
    name: str,
    weights: str = "",
    state_dict: dict[str, torch.Tensor] | None = None,
    origin: str = "auto",
) -> nn.Module:
    """A frozen open_clip CLIP in eval mode, float32, with weights from a local file (no hub
    access): ``weights`` is an OpenAI TorchScript archive or state dict, or an open_clip
    checkpoint (``.pt``/``.bin``/``.safetensors``), read by :func:`read_clip_weights`; or
    ``state_dict`` is given instead (what ``wsss_ray.eval.checkpoint.load_state_dict`` makes of
    a training run folder). ``origin`` (``clip.origin``): ``auto`` detects OpenAI weights from
    the file, ``openai`` declares them, ``other`` skips the activation check. OpenAI weights
    into a non-QuickGELU architecture raise ValueError; weights that do not fit ``name`` raise
    ValueError naming the first missing and unexpected keys."""
    if origin not in ORIGINS:
        raise ValueError(f"clip.origin: one of {', '.join(ORIGINS)} (got {origin!r})")
    source = "the given state dict"
    if state_dict is None:
        if not weights:
            raise FileNotFoundError(
                f"no CLIP weights given for '{name}': set clip.weights to a local file "
                "(e.g. OpenAI's ViT-B-16.pt) or a jobs/pretrain_clip.py run folder"
            )
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"CLIP weights not found: {weights}")
        state_dict, detected = read_clip_weights(weights)
        source = weights
    else:
        detected = "unknown"
    check_activation(name, detected if origin == "auto" else origin, source)
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip warns "no pretrained weights" before we load them
    try:
        model = create_clip(name)
    finally:
        root.setLevel(level)
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict

    state = convert_state_dict(model, dict(state_dict))  # third-party layouts, as open_clip
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    if "logit_scale" in state:
        state["logit_scale"] = state["logit_scale"].reshape(1)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a shape mismatch
        first = str(err).strip().splitlines()[-1].strip()
        raise ValueError(f"{source} does not fit clip.name={name}: {first}") from None
    if missing or unexpected:
        raise ValueError(
            f"{source} does not fit clip.name={name}: {len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}"
        )
    model.float().eval().requires_grad_(False)
    return model


class DenseCLIP(nn.Module):
    """Dense access to a (frozen) open_clip ViT CLIP for CAMs and pixel features.

    ``forward`` runs the image tower block by block on inputs of any size that is a multiple of
    the patch size (position embeddings are interpolated bicubically, the class position kept),
    and returns:
    - ``patch_feats``: B x N x D patch tokens after ``ln_post`` and the projection (joint space,
      not normalised), N = h * w in row-major order;
    - ``image_feat``: B x D, their mean (the CLIP-ES image feature);
    - ``ln1``: B x N x C, the patch-token input of the last block's attention (its ``ln_1``
      output), a leaf of the graph to ``image_feat`` when ``cam=True`` so GradCAM can take
      gradients with respect to it; ``ln1_parts``: the same per image (B leaves 1 x N x C),
      for a batch whose images each need their own GradCAM;
    - ``attn``: the last ``attn_layers`` blocks' patch-to-patch attention, L x B x N x N,
      averaged over heads;
    - ``tokens`` (with ``tokens=True``, else None): every block's output patch tokens,
      L x B x N x C (the VPL decoder's input);
    - ``grid``: (h, w).
    """

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip
        visual = clip.visual
        if getattr(visual, "attn_pool", None) is not None or not hasattr(visual, "conv1"):
            raise ValueError("DenseCLIP supports plain open_clip ViT image towers only")
        self.visual = visual
        self.patch = int(visual.conv1.kernel_size[0])
        self.blocks = list(visual.transformer.resblocks)
        for blk in self.blocks:
            if not isinstance(blk.attn, nn.MultiheadAttention):
                raise ValueError("DenseCLIP needs nn.MultiheadAttention blocks")

    @property
    def logit_scale(self) -> float:
        return float(self.clip.logit_scale.detach().float().exp().clamp(max=100).reshape(-1)[0])

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        pos = self.visual.positional_embedding  # (1 + g*g) x C
        cls_pos, grid_pos = pos[:1], pos[1:]
        g = int(round(math.sqrt(grid_pos.shape[0])))
        if (h, w) == (g, g):
            return pos
        grid_pos = grid_pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)
        grid_pos = torch.nn.functional.interpolate(
            grid_pos.float(), size=(h, w), mode="bicubic", align_corners=False
        ).to(pos.dtype)
        return torch.cat([cls_pos, grid_pos.permute(0, 2, 3, 1).reshape(h * w, -1)])

    def _block(self, blk: nn.Module, x: torch.Tensor, y: torch.Tensor, need_attn: bool):
        """One residual block with ``y = ln_1(x)`` given, optionally returning attention."""
        attn = blk.attn
        if not attn.batch_first:
            y_in = y.transpose(0, 1)
            out, weights = attn(y_in, y_in, y_in, need_weights=need_attn)
            out = out.transpose(0, 1)
        else:
            out, weights = attn(y, y, y, need_weights=need_attn)
        x = x + blk.ls_1(out)
        x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
        return x, weights

    def forward(
        self, images: torch.Tensor, attn_layers: int = 0, cam: bool = False, tokens: bool = False
    ) -> dict:
        b, _, hh, ww = images.shape
        if hh % self.patch or ww % self.patch:
            raise ValueError(f"input {hh}x{ww} is not a multiple of the patch size {self.patch}")
        h, w = hh // self.patch, ww // self.patch
        v = self.visual
        x = v.conv1(images.to(v.conv1.weight.dtype)).flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(b, 1, -1)
        x = torch.cat([cls, x], dim=1) + self._pos_embed(h, w).to(x.dtype)
        x = v.ln_pre(x)
        attns, block_tokens = [], []
        first_attn = len(self.blocks) - attn_layers
        ln1, parts = None, []
        for i, blk in enumerate(self.blocks):
            last = i == len(self.blocks) - 1
            y = blk.ln_1(x)
            if last and cam:  # one leaf per image: per-image gradients of a batch
                parts = [y[j : j + 1, 1:].detach().requires_grad_(True) for j in range(b)]
                ln1 = parts[0] if b == 1 else torch.cat(parts)
                y = torch.cat([y[:, :1], ln1], dim=1)
            x, weights = self._block(blk, x, y, need_attn=i >= first_attn)
            if i >= first_attn:
                attns.append(weights[:, 1:, 1:])
            if tokens:
                block_tokens.append(x[:, 1:])
        x = v.ln_post(x)
        patch = x[:, 1:] @ v.proj if v.proj is not None else x[:, 1:]
        return {
            "patch_feats": patch,
            "image_feat": patch.mean(1),
            "ln1": ln1,
            "ln1_parts": parts,
            "attn": torch.stack(attns) if attns else None,
            "tokens": torch.stack(block_tokens) if tokens else None,
            "grid": (h, w),
        }
