"""Typed configuration for every job.

Dataclasses are the schema; YAML files in ``configs/`` hold small diffs over the defaults, and
``key.sub=value`` command-line overrides go on top (OmegaConf structured configs do the merging
and type checks). Everything is validated here, before Ray starts, and every error is one line
that names the offending key, so a typo never costs a cluster start-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

T = TypeVar("T")

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
#: GroupViT / PGSeg normalise with ImageNet's statistics in training and zero-shot evaluation
#: (their configs' img_norm_cfg; docs/FIDELITY.md); CLIP's are for CLIP towers only
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class ConfigError(ValueError):
    """A configuration problem, reported to the user as one line naming the key."""


def _f(default: Any, help: str) -> Any:  # noqa: A002 - mirrors argparse's name
    """A dataclass field with a help string (shown by ``--help`` and in the README)."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


# --------------------------------------------------------------------------------- sections
@dataclass
class SyntheticDataConfig:
    num_images: int = _f(512, "images in the generated shapes world")
    image_size: int = _f(128, "side of the generated images (pixels)")
    samples_per_shard: int = _f(128, "samples per generated WebDataset shard")
    seed: int = _f(0, "generator seed (same seed, same bytes)")


@dataclass
class DataConfig:
    train_shards: list[str] = _f(
        [], "WebDataset tar files, directories of tars or globs; empty = generate synthetic shards"
    )
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    image_size: int = _f(224, "training crop side")
    crop_scale: list[float] = _f([0.08, 1.0], "RandomResizedCrop area range")
    hflip: bool = _f(True, "random horizontal flip")
    mean: list[float] = _f(CLIP_MEAN, "normalisation mean (RGB)")
    std: list[float] = _f(CLIP_STD, "normalisation std (RGB)")
    decode_batch_size: int = _f(256, "rows per map_batches call of the decode actors")
    decode_actors: list[int] = _f([1, 2], "decode actor pool size (min, max)")
    cpus_per_decode_actor: float = _f(1.0, "logical CPUs per decode actor")
    local_shuffle_buffer: int = _f(0, "iter_torch_batches local shuffle buffer (0 = off)")
    decode_device: str = _f(
        "cpu", "cpu (decode actors decode) | cuda (actors parse, train workers decode on GPU)"
    )
    reader: str = _f(
        "fused",
        "fused (each decode actor reads its own tars; parallelism <= number of shards) | "
        "read_webdataset (read tasks pass raw bytes to the decode actors)",
    )
    passes_per_execution: int = _f(
        1,
        "epochs per Ray Data execution (fused reader): every shard is listed this many times, "
        "in one shuffled order, so the decode actors start once per N epochs, not every epoch",
    )


@dataclass
class OptimConfig:
    lr: float = _f(1e-4, "peak learning rate")
    min_lr: float = _f(1e-5, "final learning rate of the cosine schedule")
    warmup_start_lr: float = _f(1e-6, "learning rate at step 0 of the warm-up")
    warmup_steps: int = _f(0, "linear warm-up steps")
    weight_decay: float = _f(0.05, "AdamW weight decay (not applied to 1-d params)")
    betas: list[float] = _f([0.9, 0.999], "AdamW betas")
    eps: float = _f(1e-8, "AdamW eps")
    grad_clip: float = _f(5.0, "gradient clipping norm (0 = off)")
    decay_logit_scales: bool = _f(
        False, "weight decay on the logit scales too (the GroupViT/PGSeg optimizer decays them)"
    )
    schedule: str = _f(
        "cosine",
        "after the warm-up: cosine (to min_lr, over the steps after it) | timm_cosine (timm's "
        "CosineLRScheduler as GroupViT/PGSeg: cosine of the absolute step) | poly (to 0)",
    )
    poly_power: float = _f(0.9, "power of the poly schedule")


@dataclass
class TrainConfig:
    max_steps: int = _f(0, "optimizer steps to train (or give max_samples)")
    max_samples: int = _f(0, "samples to see in total, converted to steps")
    batch_size_per_worker: int = _f(32, "micro-batch per worker")
    grad_accum: int = _f(1, "gradient accumulation micro-steps per optimizer step")
    log_every: int = _f(10, "report metrics every N steps")
    ckpt_every: int = _f(100, "checkpoint every M steps (and at the end)")
    max_nonfinite: int = _f(5, "stop after this many non-finite losses in a row")
    seed: int = _f(0, "random seed")
    zero_stage: int = _f(2, "DeepSpeed ZeRO stage (0-3); one fp32 worker runs stage 0")
    precision: str = _f("auto", "auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32")
    compile: bool = _f(False, "torch.compile the image and text encoders (eager if it fails)")
    grad_checkpointing: bool = _f(False, "recompute transformer blocks in the backward")
    tf32: bool = _f(False, "TF32 matmuls and convolutions on CUDA workers (ignored on CPU)")
    fused_adamw: bool = _f(True, "torch AdamW with fused=True on CUDA workers (ignored on CPU)")


@dataclass
class ScalingConfig:
    num_workers: int = _f(2, "Ray Train workers")
    use_gpu: bool = _f(False, "one GPU per worker, NCCL, bf16")
    cpus_per_worker: float = _f(1.0, "logical CPUs per train worker")
    resources_per_worker: dict[str, float] = _f({}, "extra Ray resources per worker")


@dataclass
class RunConfig:
    name: str = _f("run", "run name: same storage_path + name resumes")
    output_dir: str = _f("outputs", "local folder for the resolved config, MLflow db, data")
    storage_path: str = _f(
        "", "Ray Train storage (local, s3://, gs://, NFS); '' = <output_dir>/ray_results"
    )
    num_checkpoints_to_keep: int = _f(2, "checkpoints kept in storage")
    max_failures: int = _f(0, "worker-group restarts before the run fails (-1 = unlimited)")


@dataclass
class TrackingConfig:
    enabled: bool = _f(True, "log to MLflow")
    uri: str = _f("", "tracking URI; '' = sqlite:///<output_dir>/mlflow.db; env overrides")
    experiment: str = _f("wsss_ray", "MLflow experiment name")


@dataclass
class RayConfig:
    num_cpus: int = _f(0, "embedded Ray only: logical CPUs (0 = enough for the job)")


@dataclass
class ClipModelConfig:
    name: str = _f("wsss-tiny", "open_clip architecture name (wsss-tiny for CPU)")
    pretrained: str = _f("", "local weights file to start from ('' = random init)")
    init_logit_scale: float = _f(1 / 0.07, "initial logit scale s (learnable, exp-parametrised)")
    max_logit_scale: float = _f(100.0, "clamp on the logit scale")


@dataclass
class TrainJobConfig:
    """Sections shared by every Ray Train job; tasks add a ``model`` section."""

    task: str = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)


@dataclass
class ClipPretrainConfig(TrainJobConfig):
    task: str = "clip"
    model: ClipModelConfig = field(default_factory=ClipModelConfig)


# ------------------------------------------------------------------------- segmentation
SEG_KINDS = ("voc", "coco", "coco_object", "context")


@dataclass
class SyntheticSegConfig:
    num_train: int = _f(64, "synthetic VOC-layout train images (when data.root is '')")
    num_val: int = _f(48, "synthetic VOC-layout val images")
    image_size: int = _f(128, "side of the generated images")
    seed: int = _f(1, "generator seed (1: disjoint from the pretraining shards' seed 0)")


@dataclass
class SegDataConfig:
    kind: str = _f(
        "voc",
        "voc | coco (COCO 2014, 80 classes, crowd = ignore) | coco_object (val2017 as GroupViT/"
        "PGSeg: COCO-Stuff things, stuff = background) | context",
    )
    root: str = _f(
        "",
        "VOC2012 / COCO 2014 / COCO 2017 (coco_object) / VOC2010 (Context) folder; '' = "
        "synthetic VOC layout",
    )
    split: str = _f(
        "val",
        "split (voc: train, val, train_aug; coco: train, val; coco_object: val; context: val)",
    )
    gt: str = _f(
        "auto",
        "coco_object ground truth: stuffthingmaps (the reference's) | instances "
        "(instances_val2017.json) | auto (stuffthingmaps when present)",
    )
    max_images: int = _f(0, "use the first N images of the split (0 = all)")
    synthetic: SyntheticSegConfig = field(default_factory=SyntheticSegConfig)


@dataclass
class ZeroShotConfig:
    templates: list[str] = _f(["a photo of a {}."], "prompt templates, averaged per class")
    class_names: str = _f(
        "reference",
        "class names in the prompts: reference (GroupViT/PGSeg's: VOC table, plant, monitor; "
        "Context airplane, plant, monitor) | readable (dining table, potted plant, tv monitor)",
    )
    topk: int = _f(5, "restrict each image to its top-k classes by the pooled embedding (0 = off)")
    bg_thresh: float = _f(
        -1.0, "background threshold; < 0 = dataset default (VOC .95 COCO .85 Context .36)"
    )
    mean: list[float] = _f(
        [],
        "normalisation mean (RGB); [] = the model's training statistics: the run's data.mean in "
        "periodic validation, ImageNet's (GroupViT/PGSeg) in the eval job",
    )
    std: list[float] = _f([], "normalisation std (RGB); [] as for mean")
    short_side: int = _f(448, "resize the short side to this before sliding")
    max_long_side: int = _f(
        2048,
        "... unless the long side would exceed this (mmseg's img_scale (2048, 448); 0 = no cap)",
    )
    window: int = _f(448, "sliding window side")
    stride: int = _f(224, "sliding window stride")


@dataclass
class InferenceConfig:
    actors: list[int] = _f([1, 2], "inference actor pool size (min, max)")
    cpus_per_actor: float = _f(1.0, "logical CPUs per inference actor")
    gpus_per_actor: float = _f(-1.0, "GPUs per actor; < 0 = 1 when the cluster has GPUs, else 0")
    batch_size: int = _f(8, "images per map_batches call")


@dataclass
class PeriodicEvalConfig:
    every: int = _f(0, "zero-shot validation every N steps and at the end (0 = off)")
    data: SegDataConfig = field(default_factory=lambda: SegDataConfig(max_images=32))
    zero_shot: ZeroShotConfig = field(default_factory=ZeroShotConfig)


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


#: the named sizes of ``wsss_ray.models.pgseg.SIZES`` (kept here so configs validate without
#: importing torch; a unit test keeps the two in step)
PGSEG_SIZES = ("vit_s", "tiny", "tiny_seg")
#: text tower activations (``wsss_ray.models.pgseg.TEXT_ACTS``)
TEXT_ACTS = ("quick_gelu", "gelu")


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


# ---------------------------------------------------------------------------------- VPL
@dataclass
class FrozenClipConfig:
    name: str = _f("ViT-B-16", "open_clip architecture of the frozen CLIP (wsss-tiny for CPU)")
    weights: str = _f(
        "",
        "local open_clip weights file, or a jobs/pretrain_clip.py run/checkpoint folder (required)",
    )


@dataclass
class PromptConfig:
    templates: list[str] = _f(["a clean origami {}."], "prompt templates, averaged per class")
    background: list[str] = _f(
        [], "background words always in the CAM softmax; [] = dataset default (VOC 25, COCO 23)"
    )


@dataclass
class PrototypeConfig:
    tau_t: float = _f(0.01, "temperature of the text target p' (restricted to Y_i + background)")
    tau_i: float = _f(0.07, "temperature of the prediction p = softmax(W f / tau_I)")
    lam: float = _f(1.0e-4, "weight of ||W||_F^2")
    init: str = _f("text", "W0: text (= Z) | zero")
    max_iter: int = _f(500, "gradient-descent iterations at most")
    tol: float = _f(1.0e-6, "stop when the objective's relative change is below this")
    patches_per_image: int = _f(0, "patch features kept per image, random (0 = all)")
    shard_images: int = _f(256, "images per cached feature shard (the unit of resume)")
    chunk_size: int = _f(65536, "feature rows per chunk of the full-batch gradient")
    log_every: int = _f(10, "print the objective every N iterations (0 = off)")


@dataclass
class CamConfig:
    prototypes: str = _f("text", "prototypes in the GradCAM softmax: text | vision")
    prototype_file: str = _f(
        "", "vision prototypes .pt ('' = prototypes.pt of this run from jobs/vpl_prototypes.py)"
    )
    scale: float = _f(1.0, "resize factor; the size is then rounded up to a patch multiple")
    refine_layers: int = _f(8, "CAA: attention of the last N blocks (0 = no refinement)")
    box_thresh: float = _f(
        -1.0, "CAA box mask at CAM > t * max; < 0 = dataset default (VOC .4 COCO .7)"
    )
    alpha: float = _f(1.0, "background score (1 - max_c CAM) ** alpha")
    crf: bool = _f(False, "dense CRF on the refined seeds (needs the crf extra)")
    conf_thresh: float = _f(0.95, "after CRF: max probability below this -> 255")


@dataclass
class VPLConfig:
    """Both VPL phase-1 jobs (vpl_prototypes, vpl_pseudo_labels) read this; outputs meet in
    <run.output_dir>/<run.name>/."""

    task: str = "vpl"
    clip: FrozenClipConfig = field(default_factory=FrozenClipConfig)
    data: SegDataConfig = field(default_factory=lambda: SegDataConfig(split="train_aug"))
    prompts: PromptConfig = field(default_factory=PromptConfig)
    prototypes: PrototypeConfig = field(default_factory=PrototypeConfig)
    cam: CamConfig = field(default_factory=CamConfig)
    infer: InferenceConfig = field(default_factory=InferenceConfig)
    num_overlays: int = _f(4, "image | ground truth | pseudo-label overlays logged to MLflow")
    seed: int = _f(0, "seed of the patch subsampling")
    run: RunConfig = field(default_factory=lambda: RunConfig(name="vpl"))
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)


@dataclass
class SegTrainDataConfig:
    """Images of a segmentation split with phase-1 pseudo-labels, augmented for training."""

    seg: SegDataConfig = field(default_factory=lambda: SegDataConfig(split="train_aug"))
    crop_size: int = _f(320, "training crop side (a multiple of the CLIP patch size)")
    scale_range: list[float] = _f([0.5, 2.0], "random rescale range before the crop")
    hflip: bool = _f(True, "random horizontal flip")
    mean: list[float] = _f(CLIP_MEAN, "normalisation mean (RGB)")
    std: list[float] = _f(CLIP_STD, "normalisation std (RGB)")
    decode_batch_size: int = _f(16, "rows per map_batches call of the decode actors")
    decode_actors: list[int] = _f([1, 2], "decode actor pool size (min, max)")
    cpus_per_decode_actor: float = _f(1.0, "logical CPUs per decode actor")
    local_shuffle_buffer: int = _f(0, "iter_torch_batches local shuffle buffer (0 = off)")


@dataclass
class PhaseOneConfig:
    name: str = _f("vpl", "run.name of the phase-1 jobs (their outputs: <output_dir>/<name>/)")
    folder: str = _f("", "phase-1 output folder; '' = <run.output_dir>/<phase1.name>")
    labels: str = _f("vision", "pseudo-labels to train on: vision | text (pseudo_labels_<labels>/)")
    prototypes: str = _f("", "vision prototypes .pt for RSC; '' = <folder>/prototypes.pt")


@dataclass
class DecoderConfig:
    embed_dim: int = _f(256, "decoder width")
    depth: int = _f(3, "transformer layers")
    heads: int = _f(8, "attention heads")
    dropout: float = _f(0.1, "dropout (transformer, before the classifier)")
    lr_mult: float = _f(10.0, "decoder learning rate = optim.lr * lr_mult (WeCLIP)")


@dataclass
class RSCConfig:
    weight: float = _f(0.1, "lambda_rsc: total = L_seg + weight * L_RSC (0 = no RSC)")
    tau: float = _f(0.1, "InfoNCE temperature tau_r over the prototypes")


@dataclass
class SegInferConfig:
    scales: list[float] = _f([1.0, 0.75], "test scales, softmax averaged")
    flip: bool = _f(True, "add horizontally flipped inputs")
    crf: bool = _f(False, "dense CRF on the averaged probabilities (needs the crf extra)")


@dataclass
class SegValConfig:
    every: int = _f(0, "validation mIoU every N steps and at the end (0 = off)")
    data: SegDataConfig = field(default_factory=lambda: SegDataConfig(max_images=32))
    test: SegInferConfig = field(default_factory=lambda: SegInferConfig(scales=[1.0], flip=False))


@dataclass
class VPLTrainConfig(TrainJobConfig):
    """VPL phase 2 (jobs/train_vpl.py): a decoder on the frozen CLIP, trained on phase-1
    pseudo-labels with the segmentation loss and Regional Semantic Contrast."""

    task: str = "vpl_seg"
    clip: FrozenClipConfig = field(default_factory=FrozenClipConfig)
    data: SegTrainDataConfig = field(default_factory=SegTrainDataConfig)  # type: ignore[assignment]
    phase1: PhaseOneConfig = field(default_factory=PhaseOneConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    rsc: RSCConfig = field(default_factory=RSCConfig)
    eval: SegValConfig = field(default_factory=SegValConfig)


@dataclass
class VPLEvalConfig:
    """jobs/eval_vpl.py: multi-scale + flip inference of a phase-2 decoder on a split."""

    task: str = "vpl_eval"
    clip: FrozenClipConfig = field(default_factory=FrozenClipConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    checkpoint: str = _f("", "jobs/train_vpl.py run folder, checkpoint folder or .pt (required)")
    data: SegDataConfig = field(default_factory=SegDataConfig)
    test: SegInferConfig = field(default_factory=SegInferConfig)
    infer: InferenceConfig = field(default_factory=InferenceConfig)
    num_overlays: int = _f(4, "image | ground truth | prediction overlays logged to MLflow")
    run: RunConfig = field(default_factory=lambda: RunConfig(name="eval_vpl"))
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)


def phase1_folder(cfg: VPLTrainConfig) -> Path:
    """The phase-1 output folder the training reads pseudo-labels and prototypes from."""
    return Path(cfg.phase1.folder or os.path.join(cfg.run.output_dir, cfg.phase1.name))


def pseudo_label_dir(cfg: VPLTrainConfig) -> Path:
    lab = cfg.phase1.labels
    if lab in ("vision", "text"):
        return phase1_folder(cfg) / f"pseudo_labels_{lab}"
    return Path(lab)


def prototypes_path(cfg: VPLTrainConfig) -> Path:
    return (
        Path(cfg.phase1.prototypes)
        if cfg.phase1.prototypes
        else (phase1_folder(cfg) / "prototypes.pt")
    )


# ------------------------------------------------------------------------------- loading
def _explain(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError) or "not in" in str(err):
        return f"config error: unknown key '{key}'"
    msg = str(err).splitlines()[0].strip()
    return f"config error: {key}: {msg}"


def load_config(schema: type[T], config_file: str | None, overrides: list[str]) -> T:
    """Merge defaults <- YAML file <- dotted overrides, check types and paths, return a typed
    dataclass instance. Raises :class:`ConfigError` with a one-line message naming the key."""
    base = OmegaConf.structured(schema)
    try:
        if config_file:
            if not os.path.isfile(config_file):
                raise ConfigError(f"config error: --config file not found: {config_file}")
            base = OmegaConf.merge(base, OmegaConf.load(config_file))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"config error: override '{item}' is not of the form key=value")
            base = OmegaConf.merge(base, OmegaConf.from_dotlist([item]))
        missing = sorted(OmegaConf.missing_keys(base))
        if missing:
            raise ConfigError(f"config error: required key '{missing[0]}' has no value")
        cfg = OmegaConf.to_object(base)
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err)) from None
    validate(cfg)
    return cfg  # type: ignore[return-value]


def _expand_paths(key: str, entries: list[str]) -> list[str]:
    files: list[str] = []
    for entry in entries:
        if entry.startswith(("s3://", "gs://", "gcs://", "abfs://")):
            files.append(entry)
            continue
        if os.path.isdir(entry):
            found = sorted(glob.glob(os.path.join(entry, "**", "*.tar"), recursive=True))
        else:
            found = sorted(glob.glob(entry))
        if not found:
            raise ConfigError(f"config error: {key}: no such file or no .tar files in '{entry}'")
        files.extend(os.path.abspath(f) for f in found)
    return files


def validate(cfg: Any) -> None:
    """Semantic checks the type system cannot express. Raises ConfigError."""

    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"config error: {key}: {msg}")

    if isinstance(cfg, TrainJobConfig):
        t, d, o = cfg.train, cfg.data, cfg.optim
        need(
            o.schedule in ("cosine", "timm_cosine", "poly"),
            "optim.schedule",
            "cosine | timm_cosine | poly",
        )
        need(
            t.max_steps > 0 or t.max_samples > 0, "train.max_steps", "give max_steps or max_samples"
        )
        need(t.batch_size_per_worker > 0, "train.batch_size_per_worker", "must be > 0")
        need(t.grad_accum >= 1, "train.grad_accum", "must be >= 1")
        need(t.log_every > 0, "train.log_every", "must be > 0")
        need(t.ckpt_every > 0, "train.ckpt_every", "must be > 0")
        need(t.zero_stage in (0, 1, 2, 3), "train.zero_stage", "must be 0, 1, 2 or 3")
        need(t.precision in ("auto", "bf16", "fp32"), "train.precision", "auto | bf16 | fp32")
        need(cfg.scaling.num_workers >= 1, "scaling.num_workers", "must be >= 1")
        need(bool(cfg.run.name.strip()), "run.name", "must not be empty")
        need(
            len(d.decode_actors) == 2 and 1 <= d.decode_actors[0] <= d.decode_actors[1],
            "data.decode_actors",
            "needs (min, max) with 1 <= min <= max",
        )
        need(len(d.mean) == 3 and len(d.std) == 3, "data.mean", "mean and std need 3 values")
    if isinstance(cfg, TrainJobConfig) and isinstance(cfg.data, DataConfig):
        d = cfg.data
        need(d.decode_device in ("cpu", "cuda"), "data.decode_device", "cpu | cuda")
        need(d.reader in ("fused", "read_webdataset"), "data.reader", "fused | read_webdataset")
        need(d.passes_per_execution >= 1, "data.passes_per_execution", "must be >= 1")
        need(
            d.passes_per_execution == 1 or d.reader == "fused",
            "data.passes_per_execution",
            "needs data.reader=fused (read_webdataset runs one pass per execution)",
        )
        need(
            d.decode_device == "cpu" or cfg.scaling.use_gpu,
            "data.decode_device",
            "cuda decodes on the train workers' GPUs: needs scaling.use_gpu=true",
        )
        need(len(d.crop_scale) == 2, "data.crop_scale", "needs two numbers (min, max)")
        need(0 < d.crop_scale[0] <= d.crop_scale[1] <= 1, "data.crop_scale", "0 < min <= max <= 1")
        d.train_shards = _expand_paths("data.train_shards", d.train_shards)
    if isinstance(cfg, VPLTrainConfig):
        d = cfg.data
        need(d.crop_size > 0, "data.crop_size", "must be > 0")
        need(
            len(d.scale_range) == 2 and 0 < d.scale_range[0] <= d.scale_range[1],
            "data.scale_range",
            "needs (min, max) with 0 < min <= max",
        )
        need(cfg.phase1.labels.strip() != "", "phase1.labels", "vision | text | a folder")
        labels = pseudo_label_dir(cfg)
        need(
            os.path.isdir(labels),
            "phase1.labels",
            f"no pseudo-label folder {labels} (run jobs/vpl_pseudo_labels.py first)",
        )
        if cfg.rsc.weight > 0:
            protos = prototypes_path(cfg)
            need(
                os.path.isfile(protos),
                "phase1.prototypes",
                f"no prototypes file {protos} (run jobs/vpl_prototypes.py, or rsc.weight=0)",
            )
        need(cfg.rsc.tau > 0, "rsc.tau", "must be > 0")
        need(cfg.decoder.lr_mult > 0, "decoder.lr_mult", "must be > 0")
        need(cfg.eval.every >= 0, "eval.every", "must be >= 0")
    for key, dec in _decoder_sections(cfg):
        need(dec.embed_dim % dec.heads == 0, f"{key}.heads", "must divide decoder.embed_dim")
        need(dec.depth >= 1, f"{key}.depth", "must be >= 1")
    for key, te in _test_sections(cfg):
        need(bool(te.scales) and all(x > 0 for x in te.scales), f"{key}.scales", "must be > 0")
        if te.crf:
            from wsss_ray.ops.crf import crf_available

            need(crf_available(), f"{key}.crf", "needs pydensecrf: pip install -e '.[crf]'")
    if isinstance(cfg, (VPLTrainConfig, VPLEvalConfig)):
        w = cfg.clip.weights
        need(bool(w), "clip.weights", "give a local CLIP weights file or pretrain_clip run folder")
        need(os.path.exists(w), "clip.weights", f"no such file or folder: {w}")
    if isinstance(cfg, VPLEvalConfig):
        c = cfg.checkpoint
        need(bool(c), "checkpoint", "give the jobs/train_vpl.py run folder")
        need(os.path.exists(c), "checkpoint", f"no such file or folder: {c}")
    for key, sec in _seg_sections(cfg):
        need(sec.kind in SEG_KINDS, f"{key}.kind", f"one of {', '.join(SEG_KINDS)}")
        need(not sec.root or os.path.isdir(sec.root), f"{key}.root", f"no such folder: {sec.root}")
        need(sec.max_images >= 0, f"{key}.max_images", "must be >= 0")
        need(
            sec.gt in ("auto", "stuffthingmaps", "instances"),
            f"{key}.gt",
            "auto | stuffthingmaps | instances",
        )
        need(
            bool(sec.root) or sec.kind == "voc", f"{key}.root", "synthetic data is VOC layout only"
        )
    for key, z in _zero_shot_sections(cfg):
        need(
            all("{}" in t for t in z.templates) and bool(z.templates),
            f"{key}.templates",
            "every template needs a {} for the class name",
        )
        need(z.window > 0 and 0 < z.stride <= z.window, f"{key}.stride", "0 < stride <= window")
        need(z.short_side > 0, f"{key}.short_side", "must be > 0")
        need(z.topk >= 0, f"{key}.topk", "must be >= 0")
        need(
            z.class_names in ("reference", "readable"), f"{key}.class_names", "reference | readable"
        )
        need(
            len(z.mean) == len(z.std) and len(z.mean) in (0, 3),
            f"{key}.mean",
            "mean and std need 3 values each (or both [])",
        )
    infer = getattr(cfg, "infer", None)
    if isinstance(infer, InferenceConfig):
        need(
            len(infer.actors) == 2 and 1 <= infer.actors[0] <= infer.actors[1],
            "infer.actors",
            "needs (min, max) with 1 <= min <= max",
        )
        need(infer.batch_size > 0, "infer.batch_size", "must be > 0")
    if isinstance(cfg, ExportConfig):
        need(bool(cfg.model.checkpoint), "model.checkpoint", "give the checkpoint to export")
        need(bool(cfg.out), "out", "give the .pth file to write")
        need(cfg.layout in ("auto", "groupvit", "pgseg"), "layout", "auto | groupvit | pgseg")
    if isinstance(cfg, PGSegEvalConfig | ExportConfig) and cfg.model.checkpoint:
        need(
            os.path.exists(cfg.model.checkpoint),
            "model.checkpoint",
            f"no such file or folder: {cfg.model.checkpoint}",
        )
    if isinstance(cfg, PGSegPretrainConfig | PGSegEvalConfig | ExportConfig):
        need(
            cfg.model.size in PGSEG_SIZES,
            "model.size",
            f"unknown PGSeg size {cfg.model.size!r} (known: {' | '.join(PGSEG_SIZES)})",
        )
        need(cfg.model.text_act in TEXT_ACTS, "model.text_act", " | ".join(TEXT_ACTS))
    if isinstance(cfg, PGSegPretrainConfig):
        need(cfg.eval.every >= 0, "eval.every", "must be >= 0")
        need(
            cfg.npr.text_mode in ("tokens", "reference", "none"),
            "npr.text_mode",
            "tokens | reference | none",
        )
        need(
            cfg.npr.reconstruction in ("mlp", "reference"), "npr.reconstruction", "mlp | reference"
        )
        need(cfg.npr.iters >= 1, "npr.iters", "must be >= 1")
    if isinstance(cfg, VPLConfig):
        w = cfg.clip.weights
        need(bool(w), "clip.weights", "give a local CLIP weights file or pretrain_clip run folder")
        need(os.path.exists(w), "clip.weights", f"no such file or folder: {w}")
        p, c = cfg.prototypes, cfg.cam
        need(p.init in ("text", "zero"), "prototypes.init", "text | zero")
        need(p.tau_t > 0 and p.tau_i > 0, "prototypes.tau_t", "temperatures must be > 0")
        need(p.lam >= 0, "prototypes.lam", "must be >= 0")
        need(p.max_iter > 0, "prototypes.max_iter", "must be > 0")
        need(p.patches_per_image >= 0, "prototypes.patches_per_image", "must be >= 0")
        need(p.shard_images > 0, "prototypes.shard_images", "must be > 0")
        need(c.prototypes in ("text", "vision"), "cam.prototypes", "text | vision")
        need(
            not c.prototype_file or os.path.isfile(c.prototype_file),
            "cam.prototype_file",
            f"no such file: {c.prototype_file}",
        )
        need(c.scale > 0, "cam.scale", "must be > 0")
        need(c.refine_layers >= 0, "cam.refine_layers", "must be >= 0")
        need(0 <= c.conf_thresh <= 1, "cam.conf_thresh", "must be in [0, 1]")
        if c.crf:
            from wsss_ray.ops.crf import crf_available

            need(crf_available(), "cam.crf", "needs pydensecrf: pip install -e '.[crf]'")
        need(
            all("{}" in t for t in cfg.prompts.templates) and bool(cfg.prompts.templates),
            "prompts.templates",
            "every template needs a {} for the class name",
        )
    model = getattr(cfg, "model", None)
    if model is not None and getattr(model, "pretrained", ""):
        folder_ok = isinstance(cfg, PGSegPretrainConfig) and os.path.isdir(model.pretrained)
        need(
            os.path.isfile(model.pretrained) or folder_ok,
            "model.pretrained",
            f"weights file not found: {model.pretrained}",
        )


def _seg_sections(cfg: Any) -> list[tuple[str, SegDataConfig]]:
    if isinstance(cfg, (PGSegEvalConfig, VPLConfig, VPLEvalConfig)):
        return [("data", cfg.data)]
    out = []
    if isinstance(cfg, VPLTrainConfig):
        out.append(("data.seg", cfg.data.seg))
    if isinstance(cfg, (PGSegPretrainConfig, VPLTrainConfig)) and cfg.eval.every:
        out.append(("eval.data", cfg.eval.data))
    return out


def _decoder_sections(cfg: Any) -> list[tuple[str, DecoderConfig]]:
    if isinstance(cfg, (VPLTrainConfig, VPLEvalConfig)):
        return [("decoder", cfg.decoder)]
    return []


def _test_sections(cfg: Any) -> list[tuple[str, SegInferConfig]]:
    if isinstance(cfg, VPLEvalConfig):
        return [("test", cfg.test)]
    if isinstance(cfg, VPLTrainConfig):
        return [("eval.test", cfg.eval.test)]
    return []


def _zero_shot_sections(cfg: Any) -> list[tuple[str, ZeroShotConfig]]:
    if isinstance(cfg, PGSegEvalConfig):
        return [("zero_shot", cfg.zero_shot)]
    if isinstance(cfg, PGSegPretrainConfig) and cfg.eval.every:
        return [("eval.zero_shot", cfg.eval.zero_shot)]
    return []


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_flat_dict(cfg: Any) -> dict[str, Any]:
    """``{"train.max_steps": 100, ...}`` for MLflow params."""
    out: dict[str, Any] = {}

    def walk(prefix: str, obj: Any) -> None:
        if dataclasses.is_dataclass(obj):
            for f in dataclasses.fields(obj):
                walk(f"{prefix}{f.name}.", getattr(obj, f.name))
        else:
            out[prefix[:-1]] = obj

    walk("", cfg)
    return out


def save_resolved(cfg: Any, folder: str | Path) -> Path:
    path = Path(folder) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(cfg))
    return path


def reference(schema: type) -> str:
    """Every key with its default and help, for ``--help`` and the README (defaults are read
    from an instance, so sections built with non-default values show those)."""
    lines: list[str] = []

    def walk(prefix: str, cls: type, obj: Any) -> None:
        for f in dataclasses.fields(cls):
            if obj is not None:
                default = getattr(obj, f.name)
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = f.default
            if dataclasses.is_dataclass(default):
                walk(f"{prefix}{f.name}.", type(default), default)
                continue
            shown = "???" if default is MISSING or default is dataclasses.MISSING else repr(default)
            lines.append(f"  {prefix}{f.name} = {shown}    {f.metadata.get('help', '')}".rstrip())

    walk("", schema, None)
    return "\n".join(lines)


def parse_job_args(
    schema: type[T],
    description: str,
    argv: list[str] | None = None,
    default_config: str | None = None,
) -> T:
    """The command line every job shares: ``--config FILE`` plus ``key.sub=value`` overrides.
    Config errors exit with status 2 and one line on stderr."""
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (override with key.sub=value):\n" + reference(schema),
    )
    parser.add_argument(
        "--config",
        default=default_config,
        help=f"YAML file of overrides over the defaults (default: {default_config})",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(schema, args.config, args.overrides)
    except ConfigError as err:
        print(str(err), file=sys.stderr)
        raise SystemExit(2) from None
    if args.print_config:
        print(to_yaml(cfg))
        raise SystemExit(0)
    return cfg
