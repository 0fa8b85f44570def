"""PGSeg: GroupViT image encoder + CLIP-style text encoder + projector heads + PG units
(METHODS.md 1.1-1.3). Named sizes: ``vit_s`` (the paper's), ``tiny`` (CPU, seconds; two
grouping stages like ``vit_s``, what the tests exercise) and ``tiny_seg`` (the demo's: one grouping
stage of 8 groups, which on the synthetic shapes world segments where two stages of 16 -> 4
groups merge the shapes into the background; no transformer layer after the grouping, no
group-token residual in the segment tokens, and image tokens that attend only to themselves
(``attn_window=0``; the group tokens still see the whole image), so a background segment does
not carry the shapes; docs/EVALUATION.md).

Text-side prototypes (T-NPR), ``text_mode``:
- ``tokens`` (our design): EM with K = 8 over the text tower's token features (padding masked),
  mapped into the group-token space by a fixed random projection (L_PG detaches prototypes, so a
  learnable projection would never train) and matched to the stage-2 group tokens.
- ``reference``: the reference code's behaviour exactly (PGSeg ``models/transformer.py`` ``NPR``
  and ``models/pgseg.py`` ``forward_with_NPR``): EM over the 256 scalars of the pooled text
  feature (before the projector) with K = 8 one-dimensional prototypes normalised along K, matched
  to the stage-2 group tokens each reduced to the mean of its channels (B x 8 x 1; after L2
  normalisation both sides are +-1, so this term carries almost no gradient: a reference quirk).
- ``none``: no text prototypes.

Reference interchange (docs/FIDELITY.md): module names follow GroupViT's, so released GroupViT and
PGSeg state dicts load through :func:`load_groupvit_checkpoint` (projector Conv1d k=1 weights
squeezed, 0-d scales reshaped, PGSeg's NPR keys renamed), and :func:`export_reference_state`
writes ours back in their layout. ``text_act`` is the text tower's MLP activation: GroupViT's is
QuickGELU (``models/utils.py`` ``ResidualAttentionBlock``); the image tower uses exact GELU as
GroupViT's does.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import torch
from open_clip.transformer import QuickGELU, TextTransformer
from torch import nn

from wsss_ray.errors import UserInputError
from wsss_ray.models.groupvit import GroupViT, Projector
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
    # is computed from its own segment's pixels only (docs/EVALUATION.md)
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
        text_act: str = "quick_gelu",
        reconstruction: str = "mlp",
        ema_renorm: bool = True,
        pg_init_scale: float = 10.0,
        multi_label: int = 0,
    ):
        super().__init__()
        if size not in SIZES:
            raise KeyError(f"unknown PGSeg size '{size}' (known: {sorted(SIZES)})")
        if text_act not in TEXT_ACTS:
            raise ValueError(f"text_act {text_act!r}: one of {sorted(TEXT_ACTS)}")
        s = self.size = SIZES[size]
        npr = {
            "iters": npr_iters,
            "momentum": npr_momentum,
            "ema": image_ema,
            "enabled": npr_enabled,
            "hidden": s.proj_hidden,
            "reconstruction": reconstruction,
            "ema_renorm": ema_renorm,
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
            act_layer=TEXT_ACTS[text_act],
        )
        self.img_projector = Projector(s.dim, s.proj_hidden, s.proj_dim)
        self.text_projector = Projector(s.text_width, s.proj_hidden, s.proj_dim)
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(init_logit_scale)))
        if multi_label > 0:  # GroupViT's separate scale of its multi-label (noun prompt) loss
            self.multi_label_logit_scale = nn.Parameter(
                torch.full((1,), math.log(init_logit_scale))
            )
        self.text_mode = text_mode
        if npr_enabled or text_mode != "none":
            # one L_PG scale shared by every stage and the text side, where PGSeg keeps it
            # (``img_encoder.logit_scale``, init log(1/0.1)); 1 element, not 0-d, for DeepSpeed
            self.img_encoder.logit_scale = nn.Parameter(torch.full((1,), math.log(pg_init_scale)))
        if text_mode != "none":
            # matched to the last grouping stage's group tokens (stage 2 of vit_s): same count
            k = [n for n in s.group_tokens if n > 0][-1]
            if text_mode == "tokens":
                self.text_em = EMPrototypes(k, s.text_width, npr_iters, npr_momentum, True)
                g = torch.Generator().manual_seed(0)
                self.register_buffer(
                    "text_to_group",
                    torch.randn(s.text_width, s.dim, generator=g) / math.sqrt(s.text_width),
                )
            else:  # reference: 1-d prototypes normalised along K, EMA without re-normalising
                self.text_em = EMPrototypes(
                    k, 1, npr_iters, npr_momentum, True, norm="prototype", ema_renorm=False
                )

    def encode_image(self, image) -> dict:
        out = self.img_encoder(image)
        out["embed"] = self.img_projector(out["pooled"])
        return out

    def encode_text(self, tokens) -> dict:
        pooled, feats = self.text_encoder(tokens)
        return {"embed": self.text_projector(pooled), "pooled": pooled, "tokens": feats}

    def text_prototypes(self, text: dict, tokens: torch.Tensor) -> torch.Tensor | None:
        """Text-side prototypes (no gradient): B x K x dim in the group-token space (``tokens``),
        B x K x 1 (``reference``, to be matched with :meth:`groups_for_text`)."""
        if self.text_mode == "none":
            return None
        with torch.no_grad():
            if self.text_mode == "tokens":
                mu, _ = self.text_em(text["tokens"].detach(), mask_BN=tokens != 0)
                return mu.float() @ self.text_to_group.float()
            mu, _ = self.text_em(text["pooled"].detach().float().unsqueeze(-1))
            return mu.float()

    def groups_for_text(self, groups_BKC: torch.Tensor) -> torch.Tensor:
        """The group tokens the text prototypes are matched to: as they are (``tokens``), or
        reduced to the mean of their channels, B x K x 1 (``reference``, ``attn_text_center.mean
        (dim=-1, keepdim=True)``)."""
        if self.text_mode == "reference":
            return groups_BKC.mean(dim=-1, keepdim=True)
        return groups_BKC

    @property
    def pg_logit_scale(self) -> nn.Parameter | None:
        """The shared L_PG logit scale (log-parametrised), None without PG terms."""
        return getattr(self.img_encoder, "logit_scale", None)


TEXT_ACTS = {"quick_gelu": QuickGELU, "gelu": nn.GELU}

#: keys of the released PGSeg layout that its forward never uses: loaded nowhere, reported
#: as ``ignored`` (``img_encoder.mapping_text`` is built in ``PGSeg.__init__`` and never called)
REFERENCE_UNUSED = (
    re.compile(r"^img_encoder\.mapping_text\."),
    # the prototype buffer of a stage whose NPR is off (our earlier checkpoints kept it)
    re.compile(r"^img_encoder\.layers\.\d+\.em\.mu0$"),
)


def _reference_to_own(key: str) -> str:
    """A released GroupViT/PGSeg key -> ours (and our own earlier layouts -> today's)."""
    key = key.removeprefix("module.")
    key = re.sub(r"\.downsample_spatial\.mu$", ".em.mu0", key)
    key = key.replace(".downsample_spatial.mapping_x.", ".recon.")
    key = key.replace("text_encoder.Atten.mu", "text_em.mu0")
    # our projector before it took GroupViT's names: net.0 / net.1 / net.3
    key = re.sub(r"_projector\.net\.([01])\.", r"_projector.linear_hidden.\1.", key)
    return re.sub(r"_projector\.net\.3\.", "_projector.linear_out.", key)


def _fit(value: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """The reference tensor reshaped to ours when only the layout differs: 0-d scales -> 1
    element, Conv1d k=1 weights ``[out, in, 1]`` -> ``[out, in]``, ``mu [1, K, C]`` ->
    ``[K, C]``."""
    if value.shape == shape:
        return value
    if value.numel() == math.prod(shape) and (
        value.ndim == 0
        or (value.ndim == 3 and value.shape[-1] == 1 and len(shape) == 2)
        or (value.ndim == 3 and value.shape[0] == 1 and tuple(value.shape[1:]) == tuple(shape))
    ):
        return value.reshape(shape)
    return None


def convert_reference_state(
    model: nn.Module, state: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Map a state dict in the released GroupViT / PGSeg layout (or ours) onto ``model``'s keys.
    Returns (the mapped state, the report ``{loaded, missing, unexpected, mismatched,
    ignored}``)."""
    own = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unexpected, mismatched, ignored = [], [], []
    for key, value in state.items():
        k = _reference_to_own(key)
        if k not in own:
            if any(p.match(k) for p in REFERENCE_UNUSED):
                ignored.append(k)
            else:
                unexpected.append(k)
            continue
        fitted = _fit(value, own[k].shape)
        if fitted is None:
            mismatched.append(f"{k}: {tuple(value.shape)} vs {tuple(own[k].shape)}")
            continue
        mapped[k] = fitted
    report = {
        "loaded": sorted(mapped),
        "missing": sorted(set(own) - set(mapped) - {m.split(":")[0] for m in mismatched}),
        "unexpected": sorted(unexpected),
        "mismatched": mismatched,
        "ignored": sorted(ignored),
    }
    return mapped, report


class PartialCheckpointError(UserInputError):
    """A checkpoint that does not fill the model (or has tensors the model lacks)."""


def describe_partial(report: dict[str, list[str]], source: str) -> str:
    parts = []
    for kind in ("missing", "unexpected", "mismatched"):
        if report[kind]:
            parts.append(f"{len(report[kind])} {kind} (first: {', '.join(report[kind][:3])})")
    return f"{source}: partial load: " + "; ".join(parts)


#: set to 1 to let :func:`read_checkpoint_file` unpickle files that hold Python objects
TRUST_PICKLE_ENV = "WSSS_TRUST_PICKLE"


class UntrustedPickleError(UserInputError):
    """A checkpoint that only the full unpickler (which runs code from the file) can read."""


def read_checkpoint_file(path: str) -> dict[str, torch.Tensor]:
    """The state dict of a ``.pt``/``.pth`` file: a plain state dict or ``{"model": ...}`` /
    ``{"state_dict": ...}`` (the released GroupViT/PGSeg files). Files load with
    ``weights_only=True``. Files that also pickle other objects (the released GroupViT/PGSeg
    ones carry their OmegaConf config) need the full unpickler, which runs code from the file:
    only with the explicit opt-in ``WSSS_TRUST_PICKLE=1`` (else :class:`UntrustedPickleError`,
    naming the file and the opt-in)."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - e.g. pickled OmegaConf configs in released files
        if os.environ.get(TRUST_PICKLE_ENV) != "1":
            raise UntrustedPickleError(
                f"{path} pickles Python objects besides tensors (the released GroupViT/PGSeg "
                "checkpoints pickle their config); loading it runs code from the file. If you "
                f"trust it, set {TRUST_PICKLE_ENV}=1 ({str(err).splitlines()[0][:120]})"
            ) from None
        raw = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(raw, dict):
        for key in ("model", "state_dict", "module"):
            if isinstance(raw.get(key), dict):
                return raw[key]
    return raw


def load_groupvit_checkpoint(
    model: PGSeg, path_or_state: str | dict, allow_partial: bool = False, source: str = ""
) -> dict[str, list[str]]:
    """Load a released GroupViT / PGSeg checkpoint (file or state dict; ``module.`` prefixes,
    Conv1d projector weights, 0-d scales and PGSeg's NPR names are mapped) into ``model``.
    Returns the report ``{loaded, missing, unexpected, mismatched, ignored}``; anything missing,
    unexpected or mismatched raises :class:`PartialCheckpointError` naming the first keys, unless
    ``allow_partial`` (``model.allow_partial_init``: e.g. PGSeg's start from GroupViT weights,
    whose NPR modules do not exist yet); ``source`` names a given state dict in the error."""
    if isinstance(path_or_state, dict):
        state, source = path_or_state, source or "state dict"
    else:
        if not os.path.isfile(path_or_state):
            raise FileNotFoundError(f"checkpoint not found: {path_or_state}")
        state, source = read_checkpoint_file(path_or_state), path_or_state
    mapped, report = convert_reference_state(model, state)
    partial = report["missing"] or report["unexpected"] or report["mismatched"]
    if partial and not allow_partial:
        raise PartialCheckpointError(
            describe_partial(report, source)
            + " (model.allow_partial_init=true starts from what matches; check model.size, "
            "npr.enabled, npr.reconstruction and npr.text_mode against the checkpoint)"
        )
    model.load_state_dict(mapped, strict=False)
    return report


#: parameters only the training losses read: a checkpoint without them still segments
TRAINING_ONLY = ("img_encoder.logit_scale", "text_em.mu0", "multi_label_logit_scale")


def pgseg_for_state(size: str, state: dict[str, torch.Tensor], text_act: str) -> PGSeg:
    """A PGSeg whose optional parts match what ``state`` holds (ours or a released layout):
    NPR and its reconstruction kind, the text prototypes mode, the multi-label scale. The text
    activation cannot be read off the weights: ``text_act`` (GroupViT/PGSeg: quick_gelu)."""
    keys = [_reference_to_own(k) for k in state]
    npr = any(".recon." in k for k in keys)
    recon = "reference" if any(".recon.linear_out." in k for k in keys) else "mlp"
    text_mode = "none"
    mu = [v for k, v in zip(keys, state.values(), strict=True) if k == "text_em.mu0"]
    if mu:  # the reference's 1-d text prototypes, or ours over the token features
        text_mode = "reference" if mu[0].shape[-1] == 1 else "tokens"
    return PGSeg(
        size,
        npr_enabled=npr,
        text_mode=text_mode,
        text_act=text_act,
        reconstruction=recon,
        multi_label=int("multi_label_logit_scale" in keys),
    )


def load_for_inference(size: str, state: dict[str, torch.Tensor], text_act: str, source: str):
    """(model in eval mode, load report) for evaluation and inference: the model is built to
    match ``state``; anything missing beyond :data:`TRAINING_ONLY`, unexpected or mismatched is
    a :class:`PartialCheckpointError` (often a wrong ``model.size``)."""
    model = pgseg_for_state(size, state, text_act)
    mapped, report = convert_reference_state(model, state)
    report["missing"] = [k for k in report["missing"] if k not in TRAINING_ONLY]
    if report["missing"] or report["unexpected"] or report["mismatched"]:
        raise PartialCheckpointError(
            describe_partial(report, source) + f"; does it fit PGSeg '{size}' (model.size)?"
        )
    model.load_state_dict(mapped, strict=False)
    return model.eval(), report


def export_reference_state(model: PGSeg) -> dict[str, torch.Tensor]:
    """Our weights in the released layout: GroupViT's when the model has neither NPR nor text
    prototypes (``wsss_ray.export`` drops them for ``layout=groupvit``), PGSeg's when it has NPR
    (which needs ``npr.reconstruction: reference``; the text prototypes buffer is the reference's
    [1, K, 1] only with ``npr.text_mode: reference``, else a unit placeholder, as the reference's
    forward never reads it at inference). Scales become 0-d, projector weights
    Conv1d ``[out, in, 1]``."""
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu().clone()
        if key == "text_to_group":
            continue  # ours only (tokens mode), not part of the reference model
        if key.endswith("logit_scale"):
            value = value.reshape(())
        if re.search(r"(_projector|\.recon)\.linear_(hidden\.0|out)\.weight$", key):
            value = value.unsqueeze(-1)
        if re.search(r"\.recon\.fc[12]\.", key):
            raise ValueError(
                "export: npr.reconstruction=mlp has no counterpart in the reference layout "
                "(train with npr.reconstruction=reference, or npr.enabled=false for GroupViT's)"
            )
        if key.endswith(".em.mu0"):  # only with NPR, whose mapping_x it goes with
            key, value = key.replace(".em.mu0", ".downsample_spatial.mu"), value.unsqueeze(0)
        key = key.replace(".recon.", ".downsample_spatial.mapping_x.")
        if key == "text_em.mu0":
            key = "text_encoder.Atten.mu"
            if value.shape[-1] != 1:  # tokens mode: the reference's shape, unit along K
                k = value.shape[0]
                value = torch.full((k, 1), 1 / math.sqrt(k))
            value = value.unsqueeze(0)
        out[key] = value
    if any(".downsample_spatial." in k for k in out):  # PGSeg's layout: its text NPR buffer and
        if "text_encoder.Atten.mu" not in out:  # unused head exist whatever our text mode
            k = [n for n in model.size.group_tokens if n > 0][-1]
            out["text_encoder.Atten.mu"] = torch.full((1, k, 1), 1 / math.sqrt(k))
        out.update(_unused_mapping_text(model))
    return out


def _unused_mapping_text(model: PGSeg) -> dict[str, torch.Tensor]:
    """PGSeg's ``img_encoder.mapping_text`` (ProjectMLP dim -> 4096 -> 256, never called in its
    forward), freshly initialised so the export loads into the reference model strictly."""
    s = model.size
    head = Projector(s.dim, s.proj_hidden, 256)  # out_dim=256 in the reference
    out = {}
    for key, value in head.state_dict().items():
        if key.endswith("weight") and value.ndim == 2:
            value = value.unsqueeze(-1)
        out[f"img_encoder.mapping_text.{key}"] = value.clone()
    return out
