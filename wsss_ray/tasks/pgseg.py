"""PGSeg pretraining (METHODS.md 1.3-1.5): image-text contrastive loss plus prototype guidance.

    L = w_it L_IT + w_pg (L_PG^stage1 + L_PG^stage2) + w_text L_PG^text

Per grouping stage, the group tokens G (after the pre-assignment cross-attention, before Gumbel)
are Hungarian-matched to that stage's EM prototypes and pulled towards them by L_PG with hard
rejection; text prototypes (``npr.text_mode``) are matched to the stage-2 group tokens.
Metrics: every loss term (unweighted as ``*_raw``), the fraction of pairs kept by hard rejection,
and group-token usage (the fraction of group tokens that receive at least one token). Metrics are
detached 0-d tensors on the model's device (no host sync); the loop converts them at report time.

The Hungarian matchings are started as soon as their inputs exist (each image stage's right after
the image encoder, the text side's after the text prototypes) with
:func:`~wsss_ray.ops.matching.hungarian_match_async` and collected last, so on a GPU the scipy
solves overlap the text encoder and the contrastive loss. The permutations are the same as the
synchronous :func:`~wsss_ray.ops.matching.hungarian_match` (``overlap_matching=False``).
"""

from __future__ import annotations

import torch

from wsss_ray.config import ConfigError, PGSegPretrainConfig
from wsss_ray.losses.contrastive import GatheredContrastiveLoss
from wsss_ray.losses.multi_label import MultiLabelLoss
from wsss_ray.losses.prototype import PrototypeLoss
from wsss_ray.models.pgseg import PGSeg, load_groupvit_checkpoint
from wsss_ray.ops.gmm import EMPrototypes, flush_prototype_updates
from wsss_ray.ops.matching import (
    PendingMatch,
    gather_matched,
    hungarian_match,
    hungarian_match_async,
)
from wsss_ray.tasks.base import Task


def build_pgseg(cfg: PGSegPretrainConfig) -> PGSeg:
    """The PGSeg model a pretraining config describes."""
    m, n = cfg.model, cfg.npr
    return PGSeg(
        m.size,
        n.iters,
        n.momentum,
        n.image_ema,
        n.enabled,
        n.text_mode,
        m.gumbel_tau,
        m.init_logit_scale,
        gumbel_noise=m.gumbel_noise,
        text_act=m.text_act,
        reconstruction=n.reconstruction,
        ema_renorm=n.ema_renorm,
        pg_init_scale=cfg.loss.pg_init_scale,
        multi_label=cfg.loss.multi_label,
    )


def load_pretrained(model: PGSeg, source: str, allow_partial: bool) -> dict[str, list[str]]:
    """``model.pretrained``: a released GroupViT/PGSeg file, or one of our run folders,
    checkpoint folders or .pt files (read by ``wsss_ray.eval.checkpoint``, ZeRO shards merged)."""
    from wsss_ray.eval.checkpoint import load_state_dict

    state = load_state_dict(source)
    return load_groupvit_checkpoint(model, state, allow_partial, source=source)


class PGSegTask(Task):
    def __init__(self, cfg: PGSegPretrainConfig):
        super().__init__()
        m, n = cfg.model, cfg.npr
        self.model = build_pgseg(cfg)
        if m.pretrained:
            report = load_pretrained(self.model, m.pretrained, m.allow_partial_init)
            print(
                f"[wsss_ray] loaded {len(report['loaded'])} tensors from {m.pretrained}; "
                f"missing {len(report['missing'])}, unexpected {len(report['unexpected'])}, "
                f"shape-mismatched {len(report['mismatched'])}, ignored (unused by the "
                f"reference) {len(report['ignored'])}",
                flush=True,
            )
            if report["missing"]:
                print(f"[wsss_ray] left at init: {', '.join(report['missing'][:6])}", flush=True)
        self.it_loss = GatheredContrastiveLoss(m.max_logit_scale)
        hrs = cfg.hrs
        self.pg_loss = PrototypeLoss(hrs.phi, m.max_logit_scale, hrs.reference_column0)
        self.multi_label = MultiLabelLoss(m.max_logit_scale) if cfg.loss.multi_label else None
        self.weights = cfg.loss
        self.maximize = cfg.match.maximize
        self.npr_enabled = n.enabled
        #: start the matchings early and collect them last (same result as synchronous)
        self.overlap_matching = True
        #: the prototype modules: their EMA of every stage is applied at once, after the forward
        self.prototype_modules = [m for m in self.model.modules() if isinstance(m, EMPrototypes)]
        for em in self.prototype_modules:
            em.deferred = True

    def _start_match(self, groups: torch.Tensor, protos: torch.Tensor) -> PendingMatch | None:
        if not self.overlap_matching:
            return None
        return hungarian_match_async(groups.detach(), protos, maximize=self.maximize)

    def _pg(self, groups, protos, pending: PendingMatch | None = None):
        if pending is None:
            perm = hungarian_match(groups.detach(), protos, maximize=self.maximize)
        else:
            perm = pending.result()
        matched = gather_matched(protos.to(groups.dtype), perm)
        return self.pg_loss(groups, matched, self.model.pg_logit_scale)

    def sync_batchnorm(self) -> PGSegTask:
        """Only the projector heads, as the reference converts them (GroupViT/PGSeg
        ``models/multi_label_contrastive.py``); NPR's ``mapping_x`` BatchNorm stays per worker."""
        m = self.model
        m.img_projector = torch.nn.SyncBatchNorm.convert_sync_batchnorm(m.img_projector)
        m.text_projector = torch.nn.SyncBatchNorm.convert_sync_batchnorm(m.text_projector)
        return self

    def _encode_text(self, tokens: torch.Tensor):
        """(caption outputs, noun-prompt embeddings B x n x D or None, caption tokens). With
        ``loss.multi_label`` the captions and their prompts are encoded in one batch, as GroupViT
        does (the projector's BatchNorm sees them all)."""
        if tokens.ndim == 2:
            return self.model.encode_text(tokens), None, tokens
        b, n1 = tokens.shape[:2]
        out = self.model.encode_text(tokens.flatten(0, 1))
        embed = out["embed"].reshape(b, n1, -1)
        caption = {
            "embed": embed[:, 0],
            "pooled": out["pooled"].reshape(b, n1, -1)[:, 0],
            "tokens": out["tokens"].reshape(b, n1, *out["tokens"].shape[1:])[:, 0],
        }
        return caption, embed[:, 1:], tokens[:, 0]

    def training_forward(self, batch):
        image = self.model.encode_image(batch["image"])
        stages = image["stages"]
        pending: list[PendingMatch | None] = []
        if self.npr_enabled:  # the image stages' matchings run while the text side is queued
            pending = [self._start_match(s["groups"], s["protos"]) for s in stages]
        text, prompts, tokens = self._encode_text(batch["text"])
        text_protos = self.model.text_prototypes(text, tokens)
        text_pending = text_groups = None
        if text_protos is not None:
            text_groups = self.model.groups_for_text(stages[-1]["groups"])
            text_pending = self._start_match(text_groups, text_protos)
        w = self.weights
        it = self.it_loss(
            image["embed"].float(), text["embed"].float(), self.model.logit_scale.float()
        )
        losses = {"it_loss": w.it * it}
        metrics: dict[str, torch.Tensor] = {"it_raw": it.detach()}
        if prompts is not None and self.multi_label is not None:
            ml = self.multi_label(
                image["embed"], prompts, self.model.multi_label_logit_scale.float()
            )
            losses["multi_label_loss"] = w.multi_label_weight * ml
            metrics["multi_label_raw"] = ml.detach()
        for s, stage in enumerate(stages, start=1):
            hard = stage["attn_hard"]  # B x K x N, one-hot over K
            metrics[f"group_usage_{s}"] = (hard.detach().sum(-1) > 0).float().mean()
            if self.npr_enabled:
                loss, kept = self._pg(stage["groups"], stage["protos"], pending[s - 1])
                losses[f"pg{s}_loss"] = w.pg * loss
                metrics[f"pg{s}_raw"], metrics[f"hrs_kept_{s}"] = loss.detach(), kept
        if text_protos is not None:
            loss, kept = self._pg(text_groups, text_protos, text_pending)
            losses["pg_text_loss"] = w.pg_text * loss
            metrics["pg_text_raw"], metrics["hrs_kept_text"] = loss.detach(), kept
        flush_prototype_updates(self.prototype_modules)  # one all-reduce for every stage
        return losses, metrics

    @torch.no_grad()
    def after_step(self) -> None:
        cap = torch.log(torch.tensor(self.it_loss.max_logit_scale))
        self.model.logit_scale.clamp_(max=cap)
        if hasattr(self.model, "multi_label_logit_scale"):
            self.model.multi_label_logit_scale.clamp_(max=cap)
        if self.model.pg_logit_scale is not None:
            self.model.pg_logit_scale.clamp_(max=cap)


def tokenizer_spec(cfg: PGSegPretrainConfig) -> tuple[str, int | None]:
    from wsss_ray.models.pgseg import SIZES

    return "ViT-B-16", SIZES[cfg.model.size].context_length  # CLIP BPE


def check_config(cfg: PGSegPretrainConfig) -> None:
    """Checks that need the model registry (or the weights file), before Ray starts."""
    from wsss_ray.models.pgseg import SIZES, PartialCheckpointError, UntrustedPickleError

    if cfg.model.size not in SIZES:
        raise ConfigError(
            f"config error: model.size: unknown size '{cfg.model.size}' "
            f"(known: {', '.join(sorted(SIZES))})"
        )
    want = SIZES[cfg.model.size].image_size
    if cfg.data.image_size != want:
        raise ConfigError(
            f"config error: data.image_size: PGSeg {cfg.model.size} takes "
            f"{want}px inputs, got {cfg.data.image_size}"
        )
    if cfg.loss.multi_label and cfg.loss.noun_tagger == "nltk":
        from wsss_ray.data.nouns import nltk_ready

        missing = nltk_ready()
        if missing:
            raise ConfigError(
                "config error: loss.noun_tagger: nltk (GroupViT's tagger) is not usable "
                f"offline here: {missing}; or loss.noun_tagger=words"
            )
    if cfg.model.pretrained:  # a checkpoint that does not fit fails here, not in a worker
        try:
            load_pretrained(build_pgseg(cfg), cfg.model.pretrained, cfg.model.allow_partial_init)
        except (PartialCheckpointError, UntrustedPickleError) as err:
            raise ConfigError(f"config error: model.pretrained: {err}") from None
