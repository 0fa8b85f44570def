"""VPL job schemas: phase 1 (prototypes, seeds, pseudo-labels), phase 2 (the decoder) and its
evaluation, with the paths phase 2 reads from phase 1."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from wsss_ray.config.base import _f, crf_needed, need
from wsss_ray.config.common import (
    DecodeConfig,
    RayConfig,
    RunConfig,
    TrackingConfig,
    TrainJobConfig,
)
from wsss_ray.config.seg import InferenceConfig, SegDataConfig


@dataclass
class FrozenClipConfig:
    name: str = _f(
        "ViT-B-16-quickgelu",
        "open_clip architecture of the frozen CLIP: ViT-B-16-quickgelu for OpenAI's ViT-B-16.pt "
        "(QuickGELU), ViT-B-16 for GELU-trained open_clip weights, wsss-tiny for CPU",
    )
    weights: str = _f(
        "",
        "local CLIP weights: OpenAI's TorchScript ViT-B-16.pt, a state dict, an open_clip "
        "checkpoint, or a jobs/pretrain_clip.py run/checkpoint folder (required)",
    )
    origin: str = _f(
        "auto",
        "auto (a TorchScript archive or OpenAI's extra keys mean OpenAI weights) | openai | other"
        "; OpenAI weights need a QuickGELU clip.name",
    )

    def check(self) -> None:
        w = self.weights
        need(bool(w), "clip.weights", "give a local CLIP weights file or pretrain_clip run folder")
        need(os.path.exists(w), "clip.weights", f"no such file or folder: {w}")
        need(self.origin in ("auto", "openai", "other"), "clip.origin", "auto | openai | other")
        from wsss_ray.models.clip import architectures, check_activation, is_torchscript_archive

        need(self.name in architectures(), "clip.name", "not an open_clip architecture")
        if os.path.isfile(w) and self.origin != "other":
            openai = self.origin == "openai" or is_torchscript_archive(w)
            try:
                check_activation(self.name, "openai" if openai else "unknown", w)
            except ValueError as err:
                need(False, "clip.name", str(err))


@dataclass
class PromptConfig:
    templates: list[str] = _f(["a clean origami {}."], "prompt templates, averaged per class")
    background: list[str] = _f(
        [], "background words always in the CAM softmax; [] = dataset default (VOC 25, COCO 23)"
    )
    reference_typos: bool = _f(
        False, "keep CLIP-ES's misspelt COCO prompt 'sknowboard' (default: 'snowboard')"
    )

    def check(self) -> None:
        need(
            all("{}" in t for t in self.templates) and bool(self.templates),
            "prompts.templates",
            "every template needs a {} for the class name",
        )


@dataclass
class PrototypeConfig:
    tau_t: float = _f(0.01, "temperature of the text target p' (restricted to Y_i + background)")
    tau_i: float = _f(0.07, "temperature of the prediction p = softmax(W f / tau_I)")
    lam: float = _f(1.0e-4, "weight of ||W||_F^2 (its meaning depends on prototypes.reduction)")
    reduction: str = _f(
        "sum",
        "KL over patches: sum (METHODS 2.2: sum_ik KL + lam ||W||^2) | mean (mean KL + lam "
        "||W||^2, the sum's minimiser at lam * N)",
    )
    init: str = _f("text", "W0: text (= Z) | zero")
    max_iter: int = _f(500, "gradient-descent iterations at most")
    tol: float = _f(1.0e-6, "stop when the objective's relative change is below this")
    patches_per_image: int = _f(0, "patch features kept per image, random (0 = all)")
    shard_images: int = _f(256, "images per cached feature shard (the unit of resume)")
    chunk_size: int = _f(65536, "feature rows per chunk of the full-batch gradient")
    log_every: int = _f(10, "print the objective every N iterations (0 = off)")

    def mean_lam(self, patches: int) -> float:
        """The weight the solver's mean-KL objective needs for this section's objective over
        ``patches`` feature rows: sum_n KL + lam ||W||^2 = N (mean_n KL + (lam / N) ||W||^2)."""
        return self.lam / max(patches, 1) if self.reduction == "sum" else self.lam

    def check(self) -> None:
        need(self.init in ("text", "zero"), "prototypes.init", "text | zero")
        need(self.tau_t > 0 and self.tau_i > 0, "prototypes.tau_t", "temperatures must be > 0")
        need(self.lam >= 0, "prototypes.lam", "must be >= 0")
        need(self.reduction in ("sum", "mean"), "prototypes.reduction", "sum | mean")
        need(self.max_iter > 0, "prototypes.max_iter", "must be > 0")
        need(self.patches_per_image >= 0, "prototypes.patches_per_image", "must be >= 0")
        need(self.shard_images > 0, "prototypes.shard_images", "must be > 0")


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
    crf_input: str = _f(
        "rgb",
        "image of the CRF's bilateral term: rgb | clip_es (CLIP-ES's BGR minus mean cast to "
        "uint8, negative values wrapping)",
    )
    alpha_sweep: list[float] = _f(
        [1.0, 2.0], "seed mIoU also reported for each background exponent (CLIP-ES: 1, 2)"
    )

    def check(self) -> None:
        need(self.prototypes in ("text", "vision"), "cam.prototypes", "text | vision")
        need(
            not self.prototype_file or os.path.isfile(self.prototype_file),
            "cam.prototype_file",
            f"no such file: {self.prototype_file}",
        )
        need(self.scale > 0, "cam.scale", "must be > 0")
        need(self.refine_layers >= 0, "cam.refine_layers", "must be >= 0")
        need(0 <= self.conf_thresh <= 1, "cam.conf_thresh", "must be in [0, 1]")
        need(self.crf_input in ("rgb", "clip_es"), "cam.crf_input", "rgb | clip_es")
        need(all(a > 0 for a in self.alpha_sweep), "cam.alpha_sweep", "exponents must be > 0")
        if self.crf:
            crf_needed("cam.crf")


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

    def check(self) -> None:
        self.data.check("data")
        self.infer.check()
        self.clip.check()
        self.prototypes.check()
        self.cam.check()
        self.prompts.check()


@dataclass
class SegTrainDataConfig(DecodeConfig):
    """Images of a segmentation split with phase-1 pseudo-labels, augmented for training."""

    seg: SegDataConfig = field(default_factory=lambda: SegDataConfig(split="train_aug"))
    crop_size: int = _f(320, "training crop side (a multiple of the CLIP patch size)")
    scale_range: list[float] = _f([0.5, 2.0], "random rescale range before the crop")
    decode_batch_size: int = _f(16, "rows per map_batches call of the decode actors")

    def check(self, use_gpu: bool = False) -> None:
        self.check_decode()
        need(self.crop_size > 0, "data.crop_size", "must be > 0")
        need(
            len(self.scale_range) == 2 and 0 < self.scale_range[0] <= self.scale_range[1],
            "data.scale_range",
            "needs (min, max) with 0 < min <= max",
        )


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
    style: str = _f(
        "vpl",
        "vpl (all blocks, GELU MLPs, LayerNorm, positional conv, nn.TransformerEncoder) | weclip "
        "(WeCLIP's head: first L-1 blocks, ReLU MLPs, fuse + Dropout2d, CLIP QuickGELU blocks)",
    )

    def check(self, key: str = "decoder") -> None:
        need(self.style in ("vpl", "weclip"), f"{key}.style", "vpl | weclip")
        need(self.embed_dim % self.heads == 0, f"{key}.heads", "must divide decoder.embed_dim")
        need(self.depth >= 1, f"{key}.depth", "must be >= 1")


@dataclass
class OnlineLabelConfig:
    """WeCLIP's phase 2: pseudo-labels made per batch by the frozen CLIP instead of read."""

    enabled: bool = _f(
        False, "labels per batch from the frozen CLIP's CAMs (WeCLIP); false = phase-1 PNGs"
    )
    prototypes: str = _f("text", "CAM prototypes: text (WeCLIP) | vision (phase-1 W)")
    refine_layers: int = _f(8, "CAA: mean attention of the last N blocks (before RFM)")
    rfm_start: int = _f(15000, "RFM from this step on (WeCLIP: VOC 15000, COCO 40000; <0 = off)")
    rfm_layers: int = _f(6, "RFM: candidate blocks, the last N (WeCLIP: VOC 6, COCO 10)")
    box_thresh: float = _f(-1.0, "CAA box at CAM > t * max; < 0 = dataset default (.4, COCO .7)")
    alpha: float = _f(1.0, "background score (1 - max CAM) ** alpha")
    par_iters: int = _f(20, "PAR refinement iterations (0 = off)")
    par_dilations: list[int] = _f([1, 2, 4, 8, 12, 24], "PAR neighbour dilations")
    aff_weight: float = _f(0.1, "weight of the affinity loss on the decoder's sigmoid(F^T F)")
    aff_radius: int = _f(8, "affinity loss window (patches, Chebyshev distance)")

    def check(self) -> None:
        need(self.prototypes in ("text", "vision"), "online.prototypes", "text | vision")
        need(self.refine_layers >= 1, "online.refine_layers", "must be >= 1")
        need(self.rfm_layers >= 1, "online.rfm_layers", "must be >= 1")
        need(self.par_iters >= 0, "online.par_iters", "must be >= 0")
        need(all(d >= 1 for d in self.par_dilations), "online.par_dilations", "must be >= 1")
        need(self.aff_weight >= 0 and self.aff_radius >= 0, "online.aff_weight", "must be >= 0")


@dataclass
class RSCConfig:
    weight: float = _f(0.1, "lambda_rsc: total = L_seg + weight * L_RSC (0 = no RSC)")
    tau: float = _f(0.1, "InfoNCE temperature tau_r over the prototypes")
    background: str = _f(
        "one",
        "one (all background words one region and one prototype, METHODS 2.3) | words (a region "
        "per background word)",
    )


@dataclass
class SegInferConfig:
    scales: list[float] = _f([1.0, 0.75], "test scales, softmax averaged")
    flip: bool = _f(True, "add horizontally flipped inputs")
    crf: bool = _f(False, "dense CRF on the averaged probabilities (needs the crf extra)")
    protocol: str = _f(
        "ours",
        "ours (softmax averaged at the image size) | weclip (long side to long_side, logits "
        "averaged at the scale-1 decoder grid, as WeCLIP's test_msc_flip_voc.py)",
    )
    long_side: int = _f(512, "weclip protocol: the image's long side before the scales")

    def check(self, key: str) -> None:
        need(bool(self.scales) and all(x > 0 for x in self.scales), f"{key}.scales", "must be > 0")
        need(self.protocol in ("ours", "weclip"), f"{key}.protocol", "ours | weclip")
        need(self.long_side > 0, f"{key}.long_side", "must be > 0")
        if self.crf:
            crf_needed(f"{key}.crf")


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
    online: OnlineLabelConfig = field(default_factory=OnlineLabelConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    rsc: RSCConfig = field(default_factory=RSCConfig)
    eval: SegValConfig = field(default_factory=SegValConfig)

    def check(self) -> None:
        super().check()
        self.online.check()
        self.prompts.check()
        if not self.online.enabled:
            need(self.phase1.labels.strip() != "", "phase1.labels", "vision | text | a folder")
            labels = pseudo_label_dir(self)
            need(
                os.path.isdir(labels),
                "phase1.labels",
                f"no pseudo-label folder {labels} (run jobs/vpl_pseudo_labels.py first, or "
                "online.enabled=true)",
            )
        if self.needs_prototypes():
            protos = prototypes_path(self)
            need(
                os.path.isfile(protos),
                "phase1.prototypes",
                f"no prototypes file {protos} (run jobs/vpl_prototypes.py, or rsc.weight=0)",
            )
        need(self.rsc.tau > 0, "rsc.tau", "must be > 0")
        need(self.rsc.background in ("one", "words"), "rsc.background", "one | words")
        need(self.decoder.lr_mult > 0, "decoder.lr_mult", "must be > 0")
        need(self.eval.every >= 0, "eval.every", "must be >= 0")
        self.decoder.check()
        self.eval.test.check("eval.test")
        self.clip.check()
        self.data.seg.check("data.seg")
        if self.eval.every:
            self.eval.data.check("eval.data")

    def needs_prototypes(self) -> bool:
        """RSC and online vision-prototype CAMs read phase 1's W."""
        return self.rsc.weight > 0 or (self.online.enabled and self.online.prototypes == "vision")


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

    def check(self) -> None:
        self.decoder.check()
        self.test.check("test")
        self.clip.check()
        need(bool(self.checkpoint), "checkpoint", "give the jobs/train_vpl.py run folder")
        need(
            os.path.exists(self.checkpoint),
            "checkpoint",
            f"no such file or folder: {self.checkpoint}",
        )
        self.data.check("data")
        self.infer.check()


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
