"""PGSeg (and GroupViT) job schemas: pretraining, zero-shot evaluation and checkpoint export."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from wsss_ray.config.base import IMAGENET_MEAN, IMAGENET_STD, _f, need
from wsss_ray.config.common import (
    DataConfig,
    RayConfig,
    RunConfig,
    TrackingConfig,
    TrainJobConfig,
    check_pretrained,
)
from wsss_ray.config.seg import InferenceConfig, PeriodicEvalConfig, SegDataConfig, ZeroShotConfig

#: the named sizes of ``wsss_ray.models.pgseg.SIZES`` (kept here so configs validate without
#: importing torch; a unit test keeps the two in step)
PGSEG_SIZES = ("vit_s", "tiny", "tiny_seg")
#: text tower activations (``wsss_ray.models.pgseg.TEXT_ACTS``)
TEXT_ACTS = ("quick_gelu", "gelu")


@dataclass
class EvalModelConfig:
    size: str = _f("tiny", "named PGSeg size the checkpoint was trained with")
    checkpoint: str = _f(
        "",
        "Ray run folder, checkpoint folder, .pt file, or a released GroupViT / PGSeg .pth "
        "('' = untrained model, for smoke tests)",
    )
    text_act: str = _f(
        "quick_gelu",
        "text tower activation the checkpoint was trained with: quick_gelu (GroupViT/PGSeg "
        "and ours since 2026-12) | gelu (our checkpoints before)",
    )

    def check(self) -> None:
        if self.checkpoint:
            need(
                os.path.exists(self.checkpoint),
                "model.checkpoint",
                f"no such file or folder: {self.checkpoint}",
            )
        check_size_and_act(self)


@dataclass
class PGSegEvalConfig:
    task: str = "pgseg_eval"
    model: EvalModelConfig = field(default_factory=EvalModelConfig)
    data: SegDataConfig = field(default_factory=SegDataConfig)
    zero_shot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    infer: InferenceConfig = field(default_factory=InferenceConfig)
    num_overlays: int = _f(4, "image | ground truth | prediction overlays logged to MLflow")
    seed: int = _f(0, "seed of the random-group baseline")
    run: RunConfig = field(default_factory=lambda: RunConfig(name="eval_pgseg"))
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def check(self) -> None:
        self.data.check("data")
        self.zero_shot.check("zero_shot")
        self.infer.check()
        self.model.check()


@dataclass
class ExportConfig:
    """jobs/export_checkpoint.py: our checkpoint -> the released GroupViT / PGSeg layout."""

    task: str = "export"
    model: EvalModelConfig = field(default_factory=EvalModelConfig)
    out: str = _f("", "the .pth file to write ({'model': state_dict} as GroupViT saves it)")
    layout: str = _f(
        "auto",
        "auto (PGSeg's when the model has NPR, else GroupViT's) | groupvit | pgseg",
    )

    def check(self) -> None:
        need(bool(self.model.checkpoint), "model.checkpoint", "give the checkpoint to export")
        need(bool(self.out), "out", "give the .pth file to write")
        need(self.layout in ("auto", "groupvit", "pgseg"), "layout", "auto | groupvit | pgseg")
        self.model.check()


@dataclass
class PGSegModelConfig:
    size: str = _f(
        "tiny", "named size: vit_s (the paper's ViT-S) | tiny (CPU) | tiny_seg (CPU, one stage)"
    )
    pretrained: str = _f(
        "",
        "weights to start from: a released GroupViT/PGSeg .pth, or our run folder, checkpoint "
        "folder or .pt ('' = random init)",
    )
    allow_partial_init: bool = _f(
        False,
        "start from a checkpoint that fills only part of the model (e.g. PGSeg from GroupViT "
        "weights: the NPR modules start at init); false = a partial load is an error",
    )
    text_act: str = _f(
        "quick_gelu", "text tower MLP activation: quick_gelu (GroupViT/PGSeg's) | gelu"
    )
    gumbel_tau: float = _f(1.0, "Gumbel temperature of the hard assignment (training only)")
    gumbel_noise: bool = _f(
        True, "Gumbel noise on the training assignment (GroupViT); false = argmax of the logits"
    )
    init_logit_scale: float = _f(1 / 0.07, "initial image-text logit scale")
    max_logit_scale: float = _f(100.0, "clamp on the logit scales")


@dataclass
class NPRConfig:
    enabled: bool = _f(True, "PG units on the image side (EM prototypes + reconstruction)")
    iters: int = _f(10, "EM iterations T")
    momentum: float = _f(0.9, "EMA momentum of the prototype buffer")
    image_ema: bool = _f(True, "update the image-side buffer (the reference never does: a bug)")
    text_mode: str = _f("tokens", "text prototypes: tokens (ours) | reference | none")
    reconstruction: str = _f(
        "mlp",
        "reconstruction projector: mlp (GELU MLP on softmax(X mu) mu) | reference (PGSeg's "
        "mapping_x: Linear-BN-ReLU-Linear on the last EM iteration's Z times mu; loads the "
        "released PGSeg weights)",
    )
    ema_renorm: bool = _f(
        True, "re-normalise the prototype buffers after each EMA update (false = the reference)"
    )

    def check(self) -> None:
        need(
            self.text_mode in ("tokens", "reference", "none"),
            "npr.text_mode",
            "tokens | reference | none",
        )
        need(self.reconstruction in ("mlp", "reference"), "npr.reconstruction", "mlp | reference")
        need(self.iters >= 1, "npr.iters", "must be >= 1")


@dataclass
class MatchConfig:
    maximize: bool = _f(True, "Hungarian on max similarity (false = the reference's min)")


@dataclass
class HRSConfig:
    phi: float = _f(0.1, "hard rejection threshold on the min-max normalised similarity")
    reference_column0: bool = _f(
        False, "read column 0 instead of the diagonal in both masks (the reference bug)"
    )


@dataclass
class PGSegLossConfig:
    it: float = _f(1.0, "weight of the image-text loss L_IT")
    pg: float = _f(0.1, "weight of each image-side L_PG (stage 1 and 2)")
    pg_text: float = _f(0.01, "weight of the text-side L_PG")
    pg_init_scale: float = _f(
        10.0, "initial L_PG logit scale (1/0.1), one scale shared by every L_PG term"
    )
    multi_label: int = _f(
        0,
        "GroupViT's multi-label loss: N noun prompts per caption (0 = off, as PGSeg and GroupViT "
        "gcc_redcap; GroupViT gcc_yfcc: 3)",
    )
    multi_label_weight: float = _f(1.0, "weight of the multi-label loss")
    noun_tagger: str = _f(
        "nltk",
        "words that become prompts: nltk (GroupViT's POS tags; needs nltk and its data) | words "
        "(every non-stop word of 3+ letters: no nltk needed)",
    )

    def check(self) -> None:
        need(self.multi_label >= 0, "loss.multi_label", "must be >= 0")
        need(self.noun_tagger in ("nltk", "words"), "loss.noun_tagger", "nltk | words")


@dataclass
class PGSegPretrainConfig(TrainJobConfig):
    task: str = "pgseg"
    # GroupViT / PGSeg train with ImageNet statistics (CLIP pretraining keeps CLIP's)
    data: DataConfig = field(
        default_factory=lambda: DataConfig(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
    )
    model: PGSegModelConfig = field(default_factory=PGSegModelConfig)
    npr: NPRConfig = field(default_factory=NPRConfig)
    match: MatchConfig = field(default_factory=MatchConfig)
    hrs: HRSConfig = field(default_factory=HRSConfig)
    loss: PGSegLossConfig = field(default_factory=PGSegLossConfig)
    eval: PeriodicEvalConfig = field(default_factory=PeriodicEvalConfig)

    def check(self) -> None:
        super().check()
        self.eval.check()
        check_size_and_act(self.model)
        self.npr.check()
        self.loss.check()
        check_pretrained(self.model.pretrained, folder_ok=True)


def check_size_and_act(model: PGSegModelConfig | EvalModelConfig) -> None:
    need(
        model.size in PGSEG_SIZES,
        "model.size",
        f"unknown PGSeg size {model.size!r} (known: {' | '.join(PGSEG_SIZES)})",
    )
    need(model.text_act in TEXT_ACTS, "model.text_act", " | ".join(TEXT_ACTS))
