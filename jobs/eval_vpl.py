"""Evaluate a VPL phase-2 decoder (jobs/train_vpl.py) on a segmentation split: multi-scale
(test.scales, default 1 and 0.75) + flip inference, optional dense CRF (test.crf, needs the crf
extra), as Ray Data batch inference on an actor pool (GPU when present). Writes the per-class
table, results.json and overlays to <run.output_dir>/<run.name>/ and logs them to MLflow.

  python jobs/eval_vpl.py --config configs/vpl/eval_tiny.yaml
  python jobs/eval_vpl.py --config configs/vpl/eval_voc.yaml clip.weights=/weights/ViT-B-16.pt \\
      checkpoint=/runs/vpl_train_voc data.root=/data/VOCdevkit/VOC2012
"""

from __future__ import annotations

import sys

from wsss_ray.config import VPLEvalConfig, parse_job_args


def main(argv: list[str] | None = None) -> int:
    cfg = parse_job_args(VPLEvalConfig, __doc__, argv, default_config="configs/vpl/eval_tiny.yaml")
    from wsss_ray.errors import user_errors
    from wsss_ray.eval.vpl_seg import run

    with user_errors():  # a dataset or checkpoint file that cannot be used: one line, exit 2
        run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
