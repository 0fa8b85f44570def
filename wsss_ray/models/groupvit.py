"""GroupViT-style image encoder with PGSeg's PG units (METHODS.md 1.1 and 1.3).

Patch tokens are grouped twice: stage 1 concatenates 64 learnable group tokens to the 196 patch
tokens for 6 transformer layers, then a grouping block assigns every patch to one group (Gumbel
hard assignment with straight-through, training only) and returns 64 segment tokens; stage 2
does the same with 8 group tokens (zeros plus a token-mixing projection of stage 1's group
tokens); stage 3 runs 3 layers over the 8 segments. Module names follow GroupViT's so its
checkpoints load with a prefix map (``wsss_ray.models.pgseg.load_groupvit_checkpoint``).

The PG unit of each grouping stage runs EM (no gradient) over the stage's input tokens, adds a
projected reconstruction ``Z mu`` to the stage's output tokens before the grouping block, and
exposes the prototypes and the pre-assignment group tokens for L_PG. ``npr["reconstruction"]``:
``reference`` is PGSeg's ``NPR.mapping_x`` (Linear -> BN -> ReLU -> Linear, GroupViT's projector
shape) applied to the last EM iteration's responsibilities times the final prototypes, exactly as
``models/pgseg.py`` ``NPR.forward`` of the reference; ``mlp`` (ours, earlier) is a GELU MLP on
``softmax_K(X mu^T) mu``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from wsss_ray.ops.gmm import EMPrototypes


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__()
        self.fc1, self.act, self.fc2 = (
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, out or dim),
        )

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Projector(nn.Module):
    """GroupViT's ``ProjectMLP`` (2 layers): in -> hidden -> BatchNorm -> ReLU -> out, with its
    parameter names (``linear_hidden.0/1``, ``linear_out``). The reference uses Conv1d with k=1
    (weights ``[out, in, 1]``); Linear is the same map (the loader squeezes the last axis).
    Takes B x C or B x L x C (BatchNorm over the channels of every token)."""

    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__()
        self.linear_hidden = nn.Sequential(
            nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU()
        )
        self.linear_out = nn.Linear(hidden, out)

    def forward(self, x):
        shape = x.shape
        y = self.linear_out(self.linear_hidden(x.reshape(-1, shape[-1])))
        return y.reshape(*shape[:-1], y.shape[-1])


class MixerMlp(Mlp):
    """An MLP over the token axis: B x K_in x C -> B x K_out x C."""

    def forward(self, x):
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head attention. Self-attention uses one fused ``qkv`` projection, cross-attention
    separate ``q_proj``/``k_proj``/``v_proj`` (GroupViT's parameter names)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True, fused: bool = True):
        super().__init__()
        self.heads, self.fused = heads, fused
        if fused:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        else:
            self.q_proj, self.k_proj, self.v_proj = (
                nn.Linear(dim, dim, bias=qkv_bias) for _ in range(3)
            )
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, kv=None, mask=None):
        """``mask``: optional L_q x L_kv bool, true where a query may attend to a key."""
        B, N, C = x.shape
        h = self.heads

        def split(t):  # B x L x C -> B x h x L x C/h
            return t.reshape(B, t.shape[1], h, C // h).transpose(1, 2)

        if self.fused:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            kv = x if kv is None else kv
            q, k, v = self.q_proj(x), self.k_proj(kv), self.v_proj(kv)
        out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class AttnBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x, mask=None):
        x = x + self.drop_path(self.attn(self.norm1(x), mask=mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def local_attention_mask(h: int, w: int, num_group: int, window: int) -> torch.Tensor:
    """(hw + K) x (hw + K) bool attention mask, true where a query may attend to a key: an image
    token sees the image tokens within ``window`` patches (Chebyshev distance) and no group token,
    a group token sees every token. Without it (GroupViT) every image token sees the whole image
    after one layer, so a background token can carry what the shapes are."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dist = torch.maximum((ys[:, None] - ys[None]).abs(), (xs[:, None] - xs[None]).abs())
    n = h * w
    mask = torch.ones(n + num_group, n + num_group, dtype=torch.bool)
    mask[:n, :n] = dist <= window
    mask[:n, n:] = False
    return mask


class CrossAttnBlock(nn.Module):
    """Group tokens attend to image tokens (the pre-assignment block). Post-normalised: its
    inputs arrive normalised by the grouping block, so there is no pre-norm on q and kv."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.attn = Attention(dim, heads, fused=False)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, int(dim * mlp_ratio))
        self.norm_post = nn.LayerNorm(dim)

    def forward(self, q, kv):
        x = q + self.attn(q, kv)
        x = x + self.mlp(self.norm2(x))
        return self.norm_post(x)


class AssignAttention(nn.Module):
    """One-head attention whose softmax runs over the *group* axis: each image token picks a
    group. Training adds Gumbel noise (tau) and takes the hard argmax with a straight-through
    gradient; the assignment is normalised by (tokens per group + 1). ``gumbel=False`` drops the
    noise (the hard argmax of the logits, straight-through to softmax(logits / tau)): a small
    model whose assignment logits start near uniform otherwise gets random groups at every step
    and never learns to commit (measured on the tiny model: see docs/EVALUATION.md)."""

    def __init__(
        self, dim: int, gumbel_tau: float = 1.0, assign_eps: float = 1.0, gumbel: bool = True
    ):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.proj = nn.Linear(dim, dim)
        self.scale, self.tau, self.eps = dim**-0.5, gumbel_tau, assign_eps
        self.gumbel = gumbel

    def forward(self, groups_BKC, x_BNC):
        raw = self.q_proj(groups_BKC) @ self.k_proj(x_BNC).transpose(1, 2) * self.scale  # B x K x N
        soft = raw.softmax(dim=1)
        if self.training and self.gumbel:
            gumbel = -torch.empty_like(raw).exponential_().log()
            y = ((raw + gumbel) / self.tau).softmax(dim=1)
        elif self.training:
            y = (raw / self.tau).softmax(dim=1)
        else:
            y = soft
        index = y.argmax(dim=1, keepdim=True)
        hard = torch.zeros_like(y).scatter_(1, index, 1.0)
        assign = hard - y.detach() + y  # straight-through
        out = (assign / (assign.sum(dim=-1, keepdim=True) + self.eps)) @ self.v_proj(x_BNC)
        return self.proj(out), {"soft": soft, "hard": hard}


class GroupingBlock(nn.Module):
    """K group tokens -> ``num_out`` segment tokens by assigning image tokens to them.

    ``segment_residual`` (GroupViT: true) adds the group token G to its segment's token. G has
    attended to the whole image, so every segment token then carries the whole image; false
    keeps a segment token to its own image tokens (G still decides the assignment), which on
    the tiny synthetic-shapes model stops background segments from taking the shapes' names
    (docs/EVALUATION.md)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        num_group: int,
        num_out: int,
        gumbel_tau: float,
        gumbel: bool = True,
        segment_residual: bool = True,
    ):
        super().__init__()
        self.segment_residual = segment_residual
        self.norm_tokens, self.norm_x = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp_inter = MixerMlp(num_group, dim // 2, num_out)
        self.norm_post_tokens = nn.LayerNorm(dim)
        self.pre_assign_attn = CrossAttnBlock(dim, heads)
        self.assign = AssignAttention(dim, gumbel_tau, gumbel=gumbel)
        self.norm_new_x = nn.LayerNorm(dim)
        self.mlp_channels = Mlp(dim, 4 * dim)

    def forward(self, x_BNC, groups_BKC):
        x = self.norm_x(x_BNC)
        g = self.norm_post_tokens(self.mlp_inter(self.norm_tokens(groups_BKC)))
        g = self.pre_assign_attn(g, x)  # G: the group tokens L_PG regularises (before Gumbel)
        new_x, attn = self.assign(g, x)
        if self.segment_residual:
            new_x = new_x + g
        new_x = new_x + self.mlp_channels(self.norm_new_x(new_x))
        return new_x, attn, g


class GroupingLayer(nn.Module):
    """One stage: transformer layers over [tokens; group tokens], the PG unit, the grouping."""

    def __init__(
        self,
        dim: int,
        heads: int,
        depth: int,
        num_group: int,
        num_out: int,
        drop_path: list[float],
        prev_num_group: int,
        npr: dict,
        gumbel_tau: float,
        gumbel: bool = True,
        segment_residual: bool = True,
        attn_window: int | None = None,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(AttnBlock(dim, heads, drop_path=d) for d in drop_path)
        self.num_group = num_group
        self.attn_window = attn_window  # local attention of the image tokens (spatial input)
        self.grad_checkpointing = False  # set through GroupViT.grad_checkpointing
        self.downsample = None
        if num_group > 0:
            self.group_token = nn.Parameter(torch.zeros(1, num_group, dim))
            if prev_num_group > 0:  # stage 2+: zeros + a projection of the previous groups
                self.group_projector = nn.Sequential(
                    nn.LayerNorm(dim), MixerMlp(prev_num_group, dim // 2, num_group)
                )
            else:
                self.group_projector = None
                trunc_normal_(self.group_token, std=0.02)
            self.downsample = GroupingBlock(
                dim, heads, num_group, num_out, gumbel_tau, gumbel, segment_residual
            )
            reference = npr.get("reconstruction", "mlp") == "reference"
            self.em = self.recon = None
            if npr["enabled"]:
                self.em = EMPrototypes(
                    num_group,
                    dim,
                    npr["iters"],
                    npr["momentum"],
                    npr["ema"],
                    z_out="last_iteration" if reference else "final",
                    ema_renorm=npr.get("ema_renorm", True),
                )
                recon = Projector if reference else Mlp
                self.recon = recon(dim, npr["hidden"], dim)

    def _blocks(self, x, grid: tuple[int, int] | None = None, num_group: int = 0):
        """The transformer blocks; with ``grad_checkpointing`` (training) each block's
        activations are recomputed in the backward instead of kept. With ``attn_window`` and the
        ``grid`` of the image tokens, they attend locally (:func:`local_attention_mask`)."""
        mask = None
        if self.attn_window is not None and grid is not None and self.blocks:
            mask = local_attention_mask(*grid, num_group, self.attn_window).to(x.device)
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            x = checkpoint(blk, x, mask, use_reentrant=False) if ckpt else blk(x, mask)
        return x

    def forward(self, x, prev_groups=None, grid: tuple[int, int] | None = None):
        """``grid``: (h, w) when ``x`` holds the image tokens (the first stage), else None."""
        out: dict = {}
        if self.downsample is None:
            return self._blocks(x, grid), None, out
        protos = z = None
        if self.recon is not None:
            protos, z = self.em(x)  # on the stage's input tokens, no gradient
        groups = self.group_token.expand(x.shape[0], -1, -1)
        if self.group_projector is not None:
            groups = groups + self.group_projector(prev_groups)
        n = x.shape[1]
        xg = torch.cat([x, groups], dim=1)
        xg = self._blocks(xg, grid, groups.shape[1])
        x, groups = xg[:, :n], xg[:, n:]
        if self.recon is not None:
            x = x + self.recon((z @ protos).to(x.dtype))  # reconstruction X_hat = Z mu
        new_x, attn, g = self.downsample(x, groups)
        out.update(attn_soft=attn["soft"], attn_hard=attn["hard"], groups=g, protos=protos)
        return new_x, groups, out


class GroupViT(nn.Module):
    def __init__(
        self,
        image_size: int,
        patch_size: int,
        dim: int,
        heads: int,
        depths: list[int],
        group_tokens: list[int],
        output_groups: list[int],
        drop_path: float,
        npr: dict,
        gumbel_tau: float = 1.0,
        gumbel: bool = True,
        segment_residual: bool = True,
        attn_window: int | None = None,
    ):
        super().__init__()
        self.patch_embed = nn.Module()  # GroupViT's names: patch_embed.proj, patch_embed.norm
        self.patch_embed.proj = nn.Conv2d(3, dim, patch_size, patch_size)
        self.patch_embed.norm = nn.LayerNorm(dim)
        self.grid = image_size // patch_size
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid**2, dim))
        trunc_normal_(self.pos_embed, std=0.02)
        dpr = torch.linspace(0, drop_path, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        start, prev = 0, 0
        for i, depth in enumerate(depths):
            num_out = output_groups[i] if i < len(output_groups) else 0
            self.layers.append(
                GroupingLayer(
                    dim,
                    heads,
                    depth,
                    group_tokens[i],
                    num_out,
                    dpr[start : start + depth],
                    prev,
                    npr,
                    gumbel_tau,
                    gumbel,
                    segment_residual,
                    attn_window if i == 0 else None,  # later stages see segments, not patches
                )
            )
            start, prev = start + depth, group_tokens[i]
        self.norm = nn.LayerNorm(dim)
        self.apply(_init)

    @property
    def grad_checkpointing(self) -> bool:
        """Activation checkpointing of every stage's transformer blocks (training only)."""
        return any(layer.grad_checkpointing for layer in self.layers)

    @grad_checkpointing.setter
    def grad_checkpointing(self, on: bool) -> None:
        for layer in self.layers:
            layer.grad_checkpointing = bool(on)

    def interpolate_pos(self, h: int, w: int) -> torch.Tensor:
        if h == w == self.grid:
            return self.pos_embed
        pos = self.pos_embed.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False)
        return pos.permute(0, 2, 3, 1).reshape(1, h * w, -1)

    def forward(self, image_BCHW) -> dict:
        """Returns the pooled feature and, per grouping stage, the group tokens G, prototypes,
        and soft/hard assignments (B x K x N)."""
        x = self.patch_embed.proj(image_BCHW)  # B x C x h x w
        h, w = x.shape[-2:]
        x = self.patch_embed.norm(x.flatten(2).transpose(1, 2)) + self.interpolate_pos(h, w)
        stages, groups = [], None
        for i, layer in enumerate(self.layers):
            x, groups, out = layer(x, groups, (h, w) if i == 0 else None)
            if out:
                stages.append(out)
        x = self.norm(x)
        return {"pooled": x.mean(dim=1), "tokens": x, "stages": stages, "grid": (h, w)}


def _init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
