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
