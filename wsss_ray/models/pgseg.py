"""PGSeg: GroupViT image encoder + CLIP-style text encoder + projector heads + PG units
(METHODS.md 1.1-1.3). Named sizes: ``vit_s`` (the paper's), ``tiny`` (CPU, seconds; two
grouping stages like ``vit_s``, what the tests exercise) and ``tiny_seg`` (the demo's: one grouping
stage of 8 groups, which on the synthetic shapes world segments where two stages of 16 -> 4
groups merge the shapes into the background; no transformer layer after the grouping, no
group-token residual in the segment tokens, and image tokens that attend only to themselves
(``attn_window=0``; the group tokens still see the whole image), so a background segment does
not carry the shapes; README, "Zero-shot segmentation").

Text-side prototypes (T-NPR), ``text_mode``:
- ``tokens`` (our design): EM with K = 8 over the text tower's token features (padding masked),
  mapped into the group-token space by a fixed random projection (L_PG detaches prototypes, so a
  learnable projection would never train) and matched to the stage-2 group tokens.
- ``reference``: the reference code's behaviour, EM over the 256 scalars of the text embedding
  (1-d prototypes, +-1 after normalisation), mapped the same way.
- ``none``: no text prototypes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from open_clip.transformer import TextTransformer
from torch import nn

from wsss_ray.models.groupvit import GroupViT
from wsss_ray.ops.gmm import EMPrototypes


@dataclass(frozen=True)
class PGSegSize:
    image_size: int
    patch_size: int
    dim: int
    heads: int
    depths: tuple[int, ...]
    group_tokens: tuple[int, ...]
    output_groups: tuple[int, ...]
    text_width: int
    text_layers: int
    text_heads: int
    context_length: int
    proj_dim: int
    proj_hidden: int
    drop_path: float
    #: GroupViT adds the group token to its segment token; false keeps segments to their pixels
    segment_residual: bool = True
    #: None (GroupViT): image tokens attend to the whole image; r: the first stage's image tokens
    #: attend only to those within r patches and not to the group tokens
    attn_window: int | None = None


SIZES = {
    "vit_s": PGSegSize(
        224, 16, 384, 6, (6, 3, 3), (64, 8, 0), (64, 8), 256, 12, 4, 77, 256, 4096, 0.1
    ),
    "tiny": PGSegSize(64, 8, 64, 2, (1, 1, 1), (16, 4, 0), (16, 4), 64, 2, 2, 32, 64, 256, 0.0),
    # the demo's size: tiny's widths with one grouping stage (2 layers, 8 groups), no layer after
    # it, no group-token residual, image tokens that attend only to themselves: each final token
    # is computed from its own segment's pixels only (README, "Zero-shot")
    "tiny_seg": PGSegSize(
        64,
        8,
        64,
        2,
        (2, 0),
        (8, 0),
        (8,),
        64,
        2,
        2,
        32,
        64,
        256,
        0.0,
        segment_residual=False,
        attn_window=0,
    ),
}


class Projector(nn.Module):
    """in -> hidden -> BN -> ReLU -> out (GroupViT's 2-layer MLP head)."""

    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, out)
        )

    def forward(self, x):
        return self.net(x)


class PGSeg(nn.Module):
    def __init__(
        self,
        size: str = "tiny",
        npr_iters: int = 10,
        npr_momentum: float = 0.9,
        image_ema: bool = True,
        npr_enabled: bool = True,
        text_mode: str = "tokens",
        gumbel_tau: float = 1.0,
        init_logit_scale: float = 1 / 0.07,
        gumbel_noise: bool = True,
    ):
        super().__init__()
        if size not in SIZES:
            raise KeyError(f"unknown PGSeg size '{size}' (known: {sorted(SIZES)})")
        s = self.size = SIZES[size]
        npr = {
            "iters": npr_iters,
            "momentum": npr_momentum,
            "ema": image_ema,
            "enabled": npr_enabled,
            "hidden": s.proj_hidden,
        }
        self.img_encoder = GroupViT(
            s.image_size,
            s.patch_size,
            s.dim,
            s.heads,
            list(s.depths),
            list(s.group_tokens),
            list(s.output_groups),
            s.drop_path,
            npr,
            gumbel_tau,
            gumbel_noise,
            s.segment_residual,
            s.attn_window,
        )
        self.text_encoder = TextTransformer(
            context_length=s.context_length,
            width=s.text_width,
            heads=s.text_heads,
            layers=s.text_layers,
            output_dim=None,
            output_tokens=True,
        )
        self.img_projector = Projector(s.dim, s.proj_hidden, s.proj_dim)
        self.text_projector = Projector(s.text_width, s.proj_hidden, s.proj_dim)
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(init_logit_scale)))
        self.text_mode = text_mode
        if text_mode != "none":
            src = s.text_width if text_mode == "tokens" else 1
            # matched to the last grouping stage's group tokens (stage 2 of vit_s): same count
            k = [n for n in s.group_tokens if n > 0][-1]
            self.text_em = EMPrototypes(k, src, npr_iters, npr_momentum, True)
            g = torch.Generator().manual_seed(0)
            self.register_buffer(
                "text_to_group", torch.randn(src, s.dim, generator=g) / math.sqrt(src)
            )

    def encode_image(self, image) -> dict:
        out = self.img_encoder(image)
        out["embed"] = self.img_projector(out["pooled"])
        return out

    def encode_text(self, tokens) -> dict:
        pooled, feats = self.text_encoder(tokens)
        return {"embed": self.text_projector(pooled), "pooled": pooled, "tokens": feats}

    def text_prototypes(self, text: dict, tokens: torch.Tensor) -> torch.Tensor | None:
        """Text-side prototypes in the group-token space, B x K x dim (no gradient)."""
        if self.text_mode == "none":
            return None
        with torch.no_grad():
            if self.text_mode == "tokens":
                mu, _ = self.text_em(text["tokens"].detach(), mask_BN=tokens != 0)
            else:  # reference: the embedding's scalars as 1-d tokens
                mu, _ = self.text_em(text["pooled"].detach().unsqueeze(-1))
            return mu.float() @ self.text_to_group.float()


def load_groupvit_checkpoint(model: PGSeg, path: str) -> dict[str, list[str]]:
    """Start from a GroupViT/PGSeg-style checkpoint: strip ``module.``, reshape 0-d logit
    scales to 1 element, load what matches; report missing and unexpected keys."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    raw = torch.load(path, map_location="cpu", weights_only=False)
    state = raw.get("model", raw.get("state_dict", raw)) if isinstance(raw, dict) else raw
    own = model.state_dict()
    mapped, unexpected, mismatched = {}, [], []
    for key, value in state.items():
        k = key.removeprefix("module.")
        if k not in own:
            unexpected.append(k)
            continue
        if value.ndim == 0 and own[k].shape == (1,):
            value = value.reshape(1)
        if value.shape != own[k].shape:
            mismatched.append(f"{k}: {tuple(value.shape)} vs {tuple(own[k].shape)}")
            continue
        mapped[k] = value
    result = model.load_state_dict(mapped, strict=False)
    return {
        "loaded": sorted(mapped),
        "missing": sorted(result.missing_keys),
        "unexpected": sorted(unexpected),
        "mismatched": mismatched,
    }
