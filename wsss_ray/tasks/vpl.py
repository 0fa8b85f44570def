"""VPL phase 2 (METHODS.md 2.3): a segmentation decoder on a frozen CLIP, trained on phase-1
pseudo-labels with the balanced segmentation loss plus Regional Semantic Contrast.

The frozen CLIP is held outside the module tree (a plain attribute, not a submodule), so DeepSpeed
neither wraps, casts, partitions nor checkpoints it: checkpoints hold only the decoder (and the RSC
prototype buffers), and every worker loads the CLIP from ``clip.weights`` itself. It runs under
``torch.no_grad`` in float32; its per-block tokens are cast to the decoder's dtype (bf16 on GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wsss_ray.config import VPLTrainConfig
from wsss_ray.losses.rsc import RSCLoss
from wsss_ray.losses.segmentation import balanced_ce
from wsss_ray.tasks.base import Task


def load_dense_clip(name: str, weights: str, origin: str = "auto"):
    """A frozen :class:`~wsss_ray.models.clip.DenseCLIP` from a weights file or a
    ``jobs/pretrain_clip.py`` run/checkpoint folder."""
    from wsss_ray.eval.vpl import frozen_clip
    from wsss_ray.models.clip import DenseCLIP

    return DenseCLIP(frozen_clip(name, weights, origin)).eval()


def build_decoder(dense, num_classes: int, dec) -> torch.nn.Module:
    """The :class:`~wsss_ray.models.decoder.SegDecoder` that fits ``dense`` (its width, block
    count and joint dimension) with the sizes of ``dec`` (a DecoderConfig)."""
    from wsss_ray.models.decoder import SegDecoder

    visual = dense.visual
    joint = visual.proj.shape[1] if visual.proj is not None else visual.conv1.out_channels
    return SegDecoder(
        in_dim=visual.conv1.out_channels,
        num_layers=len(dense.blocks),
        num_classes=num_classes,
        joint_dim=joint,
        embed_dim=dec.embed_dim,
        depth=dec.depth,
        heads=dec.heads,
        dropout=dec.dropout,
    )


def row_classes(num_fg: int, num_rows: int) -> torch.Tensor:
    """Class of each prototype row: foreground rows 1..num_fg, then background words (0)."""
    rc = torch.zeros(num_rows, dtype=torch.long)
    rc[:num_fg] = torch.arange(1, num_fg + 1)
    return rc


class VPLSegTask(Task):
    batch_keys = ("image", "label", "present")

    def __init__(self, cfg: VPLTrainConfig, num_classes: int):
        super().__init__()
        self.cfg = cfg
        self._dense = [
            load_dense_clip(cfg.clip.name, cfg.clip.weights, cfg.clip.origin)
        ]  # hidden from DeepSpeed
        self.decoder = build_decoder(self._dense[0], num_classes, cfg.decoder)
        self.rsc_weight = cfg.rsc.weight
        self.rsc = None
        if self.rsc_weight > 0:
            from wsss_ray.config import prototypes_path

            saved = torch.load(prototypes_path(cfg), map_location="cpu", weights_only=False)
            W = saved["W"].float()
            if saved["num_fg"] != num_classes - 1:
                raise ValueError(
                    f"prototypes have {saved['num_fg']} foreground classes, the dataset "
                    f"{num_classes - 1}: phase 1 ran on another dataset"
                )
            self.rsc = RSCLoss(
                W, row_classes(saved["num_fg"], W.shape[0]), cfg.rsc.tau, float(saved["tau_i"])
            )

    @property
    def dense(self):
        return self._dense[0]

    def clip_features(self, images: torch.Tensor) -> dict:
        """The frozen CLIP's per-block tokens and patch features (no gradient, float32)."""
        dense = self.dense
        if dense.visual.conv1.weight.device != images.device:
            dense.to(images.device)
        with torch.no_grad():
            return dense(images.float(), tokens=True)

    def param_groups(self, weight_decay: float, decay_logit_scales: bool = False) -> list[dict]:
        groups = super().param_groups(weight_decay, decay_logit_scales)
        lr = self.cfg.optim.lr * self.cfg.decoder.lr_mult
        return [{**g, "lr": lr} for g in groups]

    def training_forward(self, batch):
        images, labels = batch["image"], batch["label"]
        out = self.clip_features(images)
        dtype = next(self.decoder.parameters()).dtype
        dec = self.decoder(out["tokens"].to(dtype), out["grid"])
        losses = {"seg_loss": balanced_ce(dec["logits"].float(), labels.long())}
        metrics: dict[str, float] = {}
        if self.rsc is not None:
            rsc, m = self.rsc(dec["embed"].float(), out["patch_feats"].float(), batch["present"])
            losses["rsc_loss"] = self.rsc_weight * rsc
            metrics.update(m)
        return losses, metrics


@torch.no_grad()
def predict_probs(
    dense,
    decoder: torch.nn.Module,
    image: torch.Tensor,
    scales: list[float],
    flip: bool,
) -> torch.Tensor:
    """K x H x W class probabilities for one normalised 1 x 3 x H x W image: softmax averaged
    over ``scales`` (each size rounded up to a patch multiple) and, with ``flip``, mirrored
    inputs (METHODS 2.3: scales [1, 0.75] + flip)."""
    import math

    _, _, h, w = image.shape
    p = dense.patch
    total = None
    dtype = next(decoder.parameters()).dtype
    for s in scales:
        hh = max(p, math.ceil(h * s / p) * p)
        ww = max(p, math.ceil(w * s / p) * p)
        x = F.interpolate(image, size=(hh, ww), mode="bilinear", align_corners=False)
        views = [x, x.flip(-1)] if flip else [x]
        out = dense(torch.cat(views).float(), tokens=True)
        logits = decoder(out["tokens"].to(dtype), out["grid"])["logits"].float()
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        if flip:
            logits[1] = logits[1].flip(-1)
        probs = logits.softmax(1).sum(0)
        total = probs if total is None else total + probs
    return total / (len(scales) * (2 if flip else 1))


# ------------------------------------------------------------------ registry hooks (vpl_seg)
def check_config(cfg: VPLTrainConfig) -> None:
    from wsss_ray.config import ConfigError
    from wsss_ray.models.clip import model_config

    try:
        patch = model_config(cfg.clip.name)["vision_cfg"].get("patch_size", 16)
    except KeyError as err:
        raise ConfigError(f"config error: clip.name: {err.args[0]}") from None
    if cfg.data.crop_size % patch:
        raise ConfigError(
            f"config error: data.crop_size: {cfg.data.crop_size} is not a multiple of "
            f"{cfg.clip.name}'s patch size {patch}"
        )


def prepare(cfg: VPLTrainConfig, output_dir):
    """The segmentation split with phase-1 pseudo-labels (no WebDataset shards); every image
    must have its label before Ray starts."""
    from wsss_ray.config import pseudo_label_dir
    from wsss_ray.data.seg_train import missing_pseudo_labels
    from wsss_ray.eval.datasets import resolve_source
    from wsss_ray.tasks.registry import TrainData

    source = resolve_source(cfg.data.seg, output_dir)
    labels = pseudo_label_dir(cfg)
    missing = missing_pseudo_labels(source, labels)
    if missing:  # before Ray starts: a clear error, not a failed actor later
        raise FileNotFoundError(
            f"{len(missing)} of {len(source.records)} {source.name} {source.split} images "
            f"have no pseudo-label in {labels} (e.g. {missing[0]}.png); run "
            "jobs/vpl_pseudo_labels.py on this split first"
        )
    print(
        f"[wsss_ray] {len(source.records)} {source.name} {source.split} images with "
        f"pseudo-labels from {labels}",
        flush=True,
    )
    return TrainData(source=source, task_args={"num_classes": len(source.class_names)})


def datasets(cfg: VPLTrainConfig, data, skip_counter: str | None = None) -> dict:
    from wsss_ray.config import pseudo_label_dir
    from wsss_ray.data.seg_train import pseudo_label_dataset

    d = cfg.data
    train = pseudo_label_dataset(
        data.source,
        pseudo_label_dir(cfg),
        d.crop_size,
        tuple(d.scale_range),
        d.hflip,
        list(d.mean),
        d.decode_batch_size,
        tuple(d.decode_actors),
        d.cpus_per_decode_actor,
        skip_counter,
    )
    return {"train": train}


def trial_setup(cfg: VPLTrainConfig) -> None:
    """As jobs/train_vpl.py: the prototypes path absolute for the workers."""
    from wsss_ray.config import prototypes_path

    if cfg.rsc.weight > 0:
        cfg.phase1.prototypes = str(prototypes_path(cfg).resolve())
