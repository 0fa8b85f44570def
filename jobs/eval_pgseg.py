"""Zero-shot (open-vocabulary) segmentation evaluation of a PGSeg checkpoint: mIoU on PASCAL VOC,
COCO-Object or Pascal Context, as Ray Data batch inference (METHODS.md 1.7).

  python jobs/eval_pgseg.py                       # untrained tiny model on synthetic VOC
  python jobs/eval_pgseg.py --config configs/pgseg/eval_tiny.yaml \\
      model.checkpoint=outputs/demo/ray_results/pgseg_tiny
  python jobs/eval_pgseg.py --config configs/pgseg/eval_voc.yaml \\
      model.checkpoint=/ckpt/pgseg.pth data.root=/data/VOCdevkit/VOC2012
  python jobs/eval_pgseg.py --config configs/pgseg/eval_voc.yaml model.size=vit_s \
      model.checkpoint=/ckpt/group_vit_gcc_yfcc_30e-879422e0.pth data.root=...   # released

model.checkpoint takes our run folders, checkpoint folders and .pt files, and the released GroupViT
and PGSeg .pth files (their layout is mapped; a checkpoint that does not fill the model is an
error naming the first keys, exit status 2).

Prints progress, the per-class IoU table, the mIoU next to two trivial baselines (all background;
the model's groups with random class labels); writes miou.txt, results.json and overlays under
<run.output_dir>/<run.name>/ and logs them to MLflow.
"""

from __future__ import annotations

import sys

from wsss_ray.config import PGSegEvalConfig, parse_job_args


def main(argv: list[str] | None = None) -> int:
    cfg = parse_job_args(PGSegEvalConfig, __doc__, argv)
    from wsss_ray.errors import user_errors
    from wsss_ray.eval.pgseg import run

    with user_errors():  # a partial checkpoint, a dataset file that cannot be used: exit 2
        run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
