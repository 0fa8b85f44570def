"""Segmentation decoders over a frozen CLIP's per-block patch tokens (METHODS.md 2.3):
``SegDecoder`` (``decoder.style: vpl``, described here) and ``WeCLIPDecoder`` (``decoder.style:
weclip``, WeCLIP's own head; its docstring says how it differs).

VPL's phase 2 trains only this light decoder: the CLIP image tower stays frozen, and its L blocks'
patch tokens (all of them, not only the last) are the decoder's input, because the early blocks
carry the spatial detail the last one has lost.

    tokens (L x B x N x in_dim)
      -> per-block MLP  Linear(in_dim, E) - GELU - Linear(E, E)        (one MLP per block)
      -> concat over blocks (L*E channels) -> 1x1 conv fuse to E -> LayerNorm -> GELU
      -> conditional positional encoding: x + depthwise 3x3 conv(x)
      -> ``depth``-layer pre-norm nn.TransformerEncoder (batch_first) + final LayerNorm
      -> "logits": Dropout2d -> 1x1 conv to num_classes
      -> "embed":  1x1 conv to joint_dim (not normalised; Regional Semantic Contrast uses it)

Design choices (ours, where WeCLIP's code differs or is silent):
- Positional encoding: no learnable absolute table (it would tie the decoder to one grid size);
  instead a conditional positional encoding (a residual depthwise 3x3 convolution over the token
  grid, as in CPVT's PEG). Its zero padding gives the tokens their position relative to the image
  border, and it works unchanged at any grid (h, w): training crops and sliding-window or
  multi-scale inference use different grids.
- Normalisation: LayerNorm (over channels, per token) after the fuse instead of WeCLIP's
  BatchNorm: the per-GPU batch is small (4 images), there is no SyncBN under DeepSpeed data
  parallelism, and LayerNorm has no running statistics, so train and eval normalise the same way
  and an image's output does not depend on the rest of its batch.
- Every parameter is at least 1-d (DeepSpeed ZeRO partitions and flattens parameters; 0-d ones
  are a known source of trouble).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class _BlockFusion(nn.Module):
    """Both decoders' front and ends: one MLP per CLIP block to ``embed_dim`` (``act`` between
    its two linears), the blocks concatenated and fused by a 1x1 convolution; then the
    subclass's middle (:meth:`_middle`), and the two 1x1 heads, ``classifier`` to
    ``num_classes`` and ``proj`` to ``joint_dim``. The arguments are :class:`SegDecoder`'s."""

    #: the activation between the two linears of each block's MLP
    act_layer: type[nn.Module] = nn.GELU

    def __init__(
        self,
        in_dim: int,
        num_layers: int,
        num_classes: int,
        joint_dim: int,
        embed_dim: int = 256,
        depth: int = 3,
        heads: int = 8,
        dropout: float = 0.1,
    ):
        super().__init__()
        self._check(depth)
        if embed_dim % heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by heads {heads}")
        if num_layers < 1:
            raise ValueError(f"need num_layers >= 1, got {num_layers}")
        self.num_layers = num_layers
        self.num_classes = num_classes
        self.layer_mlps = nn.ModuleList(
            nn.Sequential(
                nn.Linear(in_dim, embed_dim), self.act_layer(), nn.Linear(embed_dim, embed_dim)
            )
            for _ in range(num_layers)
        )
        self.fuse = nn.Conv2d(num_layers * embed_dim, embed_dim, kernel_size=1)
        self._middle(embed_dim, depth, heads, dropout)
        self.classifier = nn.Conv2d(embed_dim, num_classes, kernel_size=1)
        self.proj = nn.Conv2d(embed_dim, joint_dim, kernel_size=1)

    def _check(self, depth: int) -> None:
        """Raise ValueError for a depth the subclass cannot build (before anything is built)."""

    def _middle(self, embed_dim: int, depth: int, heads: int, dropout: float) -> None:
        """Register the modules between the fuse and the heads."""
        raise NotImplementedError

    def fused(self, tokens, grid: tuple[int, int]) -> torch.Tensor:
        """B x E x h x w from the first ``num_layers`` blocks' tokens (each B x N x in_dim)."""
        h, w = grid
        per_layer = [mlp(t) for mlp, t in zip(self.layer_mlps, tokens[: self.num_layers])]
        b, n, _ = per_layer[0].shape
        if n != h * w:
            raise ValueError(f"{n} tokens do not form a {h}x{w} grid")
        x = torch.cat(per_layer, dim=-1).transpose(1, 2).reshape(b, -1, h, w)
        return self.fuse(x)


class SegDecoder(_BlockFusion):
    """Segmentation head over the patch tokens of all L blocks of a frozen CLIP ViT.

    Args:
        in_dim: width of the CLIP tokens (768 for ViT-B/16).
        num_layers: L, the number of blocks whose tokens are given.
        num_classes: K, segmentation classes including background.
        joint_dim: width of the CLIP joint (image-text) space, for the "embed" output.
        embed_dim: E, the decoder's width.
        depth: transformer encoder layers.
        heads: attention heads (must divide embed_dim).
        dropout: dropout in the transformer and (as Dropout2d) before the classifier.
    """

    def _check(self, depth: int) -> None:
        if depth < 0:
            raise ValueError(f"need depth >= 0, got {depth}")

    def _middle(self, embed_dim: int, depth: int, heads: int, dropout: float) -> None:
        self.fuse_norm = nn.LayerNorm(embed_dim)
        self.act = nn.GELU()
        self.pos_conv = nn.Conv2d(embed_dim, embed_dim, 3, padding=1, groups=embed_dim)
        layer = nn.TransformerEncoderLayer(
            d_model=embed_dim,
            nhead=heads,
            dim_feedforward=4 * embed_dim,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.transformer = nn.TransformerEncoder(
            layer, num_layers=depth, norm=nn.LayerNorm(embed_dim), enable_nested_tensor=False
        )
        self.dropout = nn.Dropout2d(dropout)

    def forward(
        self, tokens: torch.Tensor | Sequence[torch.Tensor], grid: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        """tokens: L x B x N x in_dim (or a sequence of L tensors B x N x in_dim), the patch
        tokens of each block, N = h*w in row-major order, no class token; grid = (h, w).

        Returns {"logits": B x num_classes x h x w, "embed": B x joint_dim x h x w}.
        """
        h, w = grid
        if len(tokens) != self.num_layers:
            raise ValueError(f"expected tokens of {self.num_layers} blocks, got {len(tokens)}")
        x = self.fused(tokens, grid)
        b = x.shape[0]
        x = x.flatten(2).transpose(1, 2)  # B x N x E
        x = self.act(self.fuse_norm(x))
        img = x.transpose(1, 2).reshape(b, -1, h, w)
        x = x + self.pos_conv(img).flatten(2).transpose(1, 2)
        x = self.transformer(x)  # B x N x E
        feat = x.transpose(1, 2).reshape(b, -1, h, w)
        return {"logits": self.classifier(self.dropout(feat)), "embed": self.proj(feat)}


class _ClipBlock(nn.Module):
    """A CLIP residual attention block: pre-LayerNorm attention and a QuickGELU MLP (4x)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        h = self.c_fc(self.ln_2(x))
        return x + self.c_proj(h * torch.sigmoid(1.702 * h))


class WeCLIPDecoder(_BlockFusion):
    """WeCLIP's decoder (``decoder.style: weclip``): the SegFormer-style head over the first
    ``num_layers`` blocks' patch tokens (WeCLIP: 11 of ViT-B/16's 12) and a CLIP-style
    transformer, with no positional encoding and no final norm:

        per block Linear(in_dim, E) - ReLU - Linear(E, E); concat; 1x1 conv fuse; Dropout2d(0.1)
        -> "affinity" = sigmoid(F^T F) over the grid's tokens (B x N x N; WeCLIP's attn_pred)
        -> ``depth`` CLIP blocks (width E, ``heads`` heads, QuickGELU) -> 1x1 conv: "logits"
        -> "embed" = 1x1 conv to joint_dim of the transformer's output (for RSC; not WeCLIP's)

    ``forward`` takes the tokens of all L blocks (or of the first ``num_layers``) and uses the
    first ``num_layers``."""

    act_layer = nn.ReLU

    def _middle(self, embed_dim: int, depth: int, heads: int, dropout: float) -> None:
        self.dropout = nn.Dropout2d(dropout)
        self.blocks = nn.ModuleList(_ClipBlock(embed_dim, heads) for _ in range(depth))

    def forward(
        self, tokens: torch.Tensor | Sequence[torch.Tensor], grid: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        """tokens: L x B x N x in_dim (L >= num_layers), row-major patch tokens, no class
        token. Returns logits, embed (B x . x h x w) and affinity (B x N x N)."""
        h, w = grid
        if len(tokens) < self.num_layers:
            raise ValueError(f"expected tokens of >= {self.num_layers} blocks, got {len(tokens)}")
        fused = self.dropout(self.fused(tokens, grid))  # B x E x h x w
        b = fused.shape[0]
        flat = fused.flatten(2)  # B x E x N
        affinity = torch.sigmoid(flat.transpose(1, 2) @ flat)
        x = flat.transpose(1, 2)  # B x N x E
        for blk in self.blocks:
            x = blk(x)
        feat = x.transpose(1, 2).reshape(b, -1, h, w)
        return {
            "logits": self.classifier(feat),
            "embed": self.proj(feat),
            "affinity": affinity,
        }
