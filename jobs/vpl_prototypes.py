"""VPL phase 1a: learn vision prototypes W for a frozen CLIP (METHODS.md 2.2).

Dense CLIP features of every image in the split are computed once by Ray Data batch inference
and cached in shards under <run.output_dir>/<run.name>/features/ (a rerun computes only the
missing shards); then the convex KL objective is solved by gradient descent with a convergence
log, and prototypes.pt is written and logged to MLflow with the patch accuracies of the text
prototypes and of W.

  python jobs/vpl_prototypes.py --config configs/vpl/tiny.yaml \\
      clip.weights=outputs/demo/ray_results/clip_tiny      # tiny CLIP, synthetic VOC
  python jobs/vpl_prototypes.py --config configs/vpl/voc.yaml \\
      clip.weights=/weights/ViT-B-16.pt data.root=/data/VOCdevkit/VOC2012

Then: jobs/vpl_pseudo_labels.py with the same config and cam.prototypes=vision.
"""

from __future__ import annotations

import sys

from wsss_ray.config import VPLConfig, run_job


def main(argv: list[str] | None = None) -> int:
    return run_job(VPLConfig, __doc__, "wsss_ray.eval.vpl:run_prototypes", argv)


if __name__ == "__main__":
    sys.exit(main())
