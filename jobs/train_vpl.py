"""VPL phase 2: train the segmentation decoder on a frozen CLIP with Ray Train and DeepSpeed
(METHODS.md 2.3). The targets are made online per batch from the frozen CLIP's CAMs as WeCLIP
does (online.enabled=true: CAA, PAR, RFM from online.rfm_start, the affinity loss), or read from
the phase-1 pseudo-labels of jobs/vpl_pseudo_labels.py (online.enabled=false). Regional Semantic
Contrast and online vision-prototype CAMs read the vision prototypes of jobs/vpl_prototypes.py
(from the phase-1 folder <run.output_dir>/<phase1.name>/). Only the decoder trains
(decoder.style: weclip | vpl); the loss is the balanced background/foreground cross-entropy
plus online.aff_weight x L_aff plus rsc.weight x L_RSC. Validation mIoU on eval.data every
eval.every steps; checkpoints resume by run.name.

  python jobs/train_vpl.py --config configs/vpl/train_tiny.yaml
  python jobs/train_vpl.py --config configs/vpl/train_voc.yaml \\
      clip.weights=/weights/ViT-B-16.pt data.seg.root=/data/VOCdevkit/VOC2012 \\
      eval.data.root=/data/VOCdevkit/VOC2012
  python jobs/train_vpl.py --config configs/vpl/reference_weclip_voc.yaml \\
      clip.weights=/weights/ViT-B-16.pt data.seg.root=/data/VOCdevkit/VOC2012 \\
      eval.data.root=/data/VOCdevkit/VOC2012
"""

from __future__ import annotations

import sys
from pathlib import Path

from wsss_ray.config import VPLTrainConfig, parse_job_args, prototypes_path
from wsss_ray.train.driver import train_job


def main(argv: list[str] | None = None) -> int:
    cfg = parse_job_args(
        VPLTrainConfig, __doc__, argv, default_config="configs/vpl/train_tiny.yaml"
    )
    # workers may run in another directory: hand them absolute paths
    cfg.clip.weights = str(Path(cfg.clip.weights).resolve())
    if cfg.needs_prototypes():
        cfg.phase1.prototypes = str(prototypes_path(cfg).resolve())
    rc, summary = train_job(cfg)
    if summary is not None and "val/miou" in summary.metrics:
        print(f"[wsss_ray] validation mIoU {summary.metrics['val/miou']:.1f}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
