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
    """The decoder that fits ``dense`` (its width, block count and joint dimension) with the
    sizes of ``dec`` (a DecoderConfig): :class:`~wsss_ray.models.decoder.SegDecoder` over all
    blocks (``style: vpl``) or :class:`~wsss_ray.models.decoder.WeCLIPDecoder` over all but the
    last (``style: weclip``, WeCLIP's 11 of 12)."""
    from wsss_ray.models.decoder import SegDecoder, WeCLIPDecoder

    visual = dense.visual
    joint = visual.proj.shape[1] if visual.proj is not None else visual.conv1.out_channels
    weclip = getattr(dec, "style", "vpl") == "weclip"
    cls = WeCLIPDecoder if weclip else SegDecoder
    return cls(
        in_dim=visual.conv1.out_channels,
        num_layers=max(1, len(dense.blocks) - 1) if weclip else len(dense.blocks),
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


def _phase1_prototypes(cfg: VPLTrainConfig, num_classes: int) -> dict:
    from wsss_ray.config import prototypes_path

    saved = torch.load(prototypes_path(cfg), map_location="cpu", weights_only=True)
    if saved["num_fg"] != num_classes - 1:
        raise ValueError(
            f"prototypes have {saved['num_fg']} foreground classes, the dataset "
            f"{num_classes - 1}: phase 1 ran on another dataset"
        )
    return saved


class VPLSegTask(Task):
    batch_keys = ("image", "label", "present")

    def __init__(
        self,
        cfg: VPLTrainConfig,
        num_classes: int,
        class_names: list[str] | None = None,
        dataset: str = "voc",
    ):
        super().__init__()
        self.cfg = cfg
        self._dense = [
            load_dense_clip(cfg.clip.name, cfg.clip.weights, cfg.clip.origin)
        ]  # hidden from DeepSpeed
        self.decoder = build_decoder(self._dense[0], num_classes, cfg.decoder)
        self.rsc_weight = cfg.rsc.weight
        self.rsc = None
        saved = _phase1_prototypes(cfg, num_classes) if cfg.needs_prototypes() else None
        if self.rsc_weight > 0:
            W = saved["W"].float()
            rows = row_classes(saved["num_fg"], W.shape[0])
            self.rsc = RSCLoss(W, rows, cfg.rsc.tau, float(saved["tau_i"]), cfg.rsc.background)
        self.labeler = None
        if cfg.online.enabled:
            self._build_labeler(num_classes, class_names, dataset, saved)
            # forward passes done: RFM's start and resumes count from it (checkpointed)
            self.register_buffer("online_step", torch.zeros(1, dtype=torch.long))

    def _build_labeler(self, num_classes, class_names, dataset, saved) -> None:
        from wsss_ray.data.text import class_prompts, text_prototypes
        from wsss_ray.models.clip import context_length, tokenizer
        from wsss_ray.tasks.vpl_online import OnlineLabeler

        on, p = self.cfg.online, self.cfg.prompts
        if on.prototypes == "vision":
            protos, tau, num_fg = saved["W"].float(), float(saved["tau_i"]), saved["num_fg"]
        else:
            if not class_names or len(class_names) != num_classes:
                raise ValueError("online text prototypes need the dataset's class names")
            fg, bg = class_prompts(class_names, p.reference_typos)
            names = fg + (list(p.background) or bg)
            name = self.cfg.clip.name
            tok = tokenizer(name, context_length(name))
            protos = text_prototypes(self.dense.clip, tok, names, list(p.templates))
            tau, num_fg = None, len(fg)
        box = on.box_thresh if on.box_thresh >= 0 else (0.7 if dataset == "coco" else 0.4)
        self.labeler = OnlineLabeler(self.dense, protos, num_fg, on, box, tau)
        self._radius: dict = {}

    def _radius_mask(self, grid: tuple[int, int], device) -> torch.Tensor:
        from wsss_ray.losses.affinity import radius_mask

        key = (grid, str(device))
        if key not in self._radius:
            self._radius[key] = radius_mask(*grid, self.cfg.online.aff_radius, device)
        return self._radius[key]

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
        dtype = next(self.decoder.parameters()).dtype
        metrics: dict[str, float] = {}
        if self.labeler is None:
            out = self.clip_features(images)
            dec = self.decoder(out["tokens"].to(dtype), out["grid"])
        else:  # WeCLIP: decoder first (RFM reads its affinity), then this batch's labels
            out, dec, labels, rfm = self._online(images, batch["present"], labels, dtype)
            metrics["online/rfm"] = float(rfm)
            valid = labels != 255
            metrics["online/labelled"] = float(valid.float().mean())
        losses = {"seg_loss": balanced_ce(dec["logits"].float(), labels.long())}
        if self.labeler is not None and self.cfg.online.aff_weight > 0:
            from wsss_ray.losses.affinity import affinity_label, affinity_loss

            target = affinity_label(
                labels, out["grid"], self._radius_mask(out["grid"], labels.device)
            )
            aff = affinity_loss(dec["affinity"].float(), target)
            losses["aff_loss"] = self.cfg.online.aff_weight * aff
        if self.rsc is not None:
            rsc, m = self.rsc(dec["embed"].float(), out["patch_feats"].float(), batch["present"])
            losses["rsc_loss"] = self.rsc_weight * rsc
            metrics.update(m)
        return losses, metrics

    def _online(self, images, present, valid_from, dtype):
        """(CLIP outputs, decoder outputs, online labels, RFM on) for one batch."""
        dense = self.dense
        if dense.visual.conv1.weight.device != images.device:
            dense.to(images.device)
        x = images.float()
        with torch.enable_grad():  # only the last block's ln_1 leaves need a graph
            out = dense(x, attn_layers=self.labeler.attn_layers, cam=True, tokens=True)
        dec = self.decoder(out["tokens"].detach().to(dtype), out["grid"])
        step = int(self.online_step[0])
        self.online_step += 1
        start = self.cfg.online.rfm_start
        rfm = 0 <= start <= step
        affinity = dec["affinity"].detach().float() if rfm else None
        labels = self.labeler(x, out, present, valid_from != 255, affinity)
        return out, dec, labels, rfm


def _logits(dense, decoder, x: torch.Tensor) -> torch.Tensor:
    dtype = next(decoder.parameters()).dtype
    out = dense(x.float(), tokens=True)
    return decoder(out["tokens"].to(dtype), out["grid"])["logits"].float()


@torch.no_grad()
def predict_probs(
    dense,
    decoder: torch.nn.Module,
    image: torch.Tensor,
    scales: list[float],
    flip: bool,
    protocol: str = "ours",
    long_side: int = 512,
) -> torch.Tensor:
    """K x H x W class probabilities for one normalised 1 x 3 x H x W image.

    ``ours``: softmax averaged over ``scales`` (each size rounded up to a patch multiple) and,
    with ``flip``, mirrored inputs, each upsampled to H x W first (METHODS 2.3).
    ``weclip`` (WeCLIP ``test_msc_flip_voc.py``): the image resized to ``long_side`` on its long
    side, each scale's logits (flip averaged) resized to the scale-1 decoder grid and *averaged
    as logits* there, then upsampled to H x W; the ViT sees each input cut to a patch multiple
    (the bottom/right remainder dropped, as its stride-16 convolution does)."""
    import math

    _, _, h, w = image.shape
    p = dense.patch
    if protocol == "weclip":
        ratio = long_side / max(h, w)
        base = F.interpolate(
            image, size=(int(h * ratio), int(w * ratio)), mode="bilinear", align_corners=False
        )
        grid, total = None, 0.0
        for s in scales:
            x = base if s == 1.0 else F.interpolate(base, scale_factor=s, mode="bilinear")
            views = torch.cat([x, x.flip(-1)]) if flip else x  # flipped, then cut (as WeCLIP)
            views = views[..., : max(p, x.shape[-2] // p * p), : max(p, x.shape[-1] // p * p)]
            logits = _logits(dense, decoder, views)
            if grid is None:
                grid = logits.shape[-2:]
            logits = F.interpolate(logits, size=grid, mode="bilinear", align_corners=False)
            total = total + ((logits[0] + logits[1].flip(-1)) / 2 if flip else logits[0])
        mean = (total / len(scales))[None]
        up = F.interpolate(mean, size=(h, w), mode="bilinear", align_corners=False)
        return up[0].softmax(0)
    total = None
    for s in scales:
        hh = max(p, math.ceil(h * s / p) * p)
        ww = max(p, math.ceil(w * s / p) * p)
        x = F.interpolate(image, size=(hh, ww), mode="bilinear", align_corners=False)
        views = [x, x.flip(-1)] if flip else [x]
        logits = _logits(dense, decoder, torch.cat(views))
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
    task_args = {
        "num_classes": len(source.class_names),
        "class_names": list(source.class_names),
        "dataset": source.name,
    }
    if cfg.online.enabled:
        print(
            f"[wsss_ray] {len(source.records)} {source.name} {source.split} images; pseudo-labels "
            f"made online by the frozen CLIP (WeCLIP; RFM from step {cfg.online.rfm_start})",
            flush=True,
        )
        return TrainData(source=source, task_args=task_args)
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
    return TrainData(source=source, task_args=task_args)


def datasets(cfg: VPLTrainConfig, data, skip_counter: str | None = None) -> dict:
    from wsss_ray.config import pseudo_label_dir
    from wsss_ray.data.seg_train import pseudo_label_dataset

    d = cfg.data
    train = pseudo_label_dataset(
        data.source,
        None if cfg.online.enabled else pseudo_label_dir(cfg),
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

    if cfg.needs_prototypes():
        cfg.phase1.prototypes = str(prototypes_path(cfg).resolve())
