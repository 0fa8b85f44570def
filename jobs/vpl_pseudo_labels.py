"""VPL phase 1b: CAM seeds and pseudo-labels for a whole split (METHODS.md 2.1).

Per image: softmax-GradCAM over (present classes + background words) with text prototypes or the
learned vision prototypes (cam.prototypes=text|vision), CAA attention refinement, background
score, optional dense CRF + confidence filter; as Ray Data batch inference on an actor pool (GPU
when present). Writes one grey label PNG per image to
<run.output_dir>/<run.name>/pseudo_labels_<mode>/ and reports the mIoU of the raw CAMs, the
refined seeds and the pseudo-labels against the split's masks (also to MLflow, with overlays).

  python jobs/vpl_pseudo_labels.py --config configs/vpl/tiny.yaml \\
      clip.weights=outputs/demo/ray_results/clip_tiny cam.prototypes=vision
  python jobs/vpl_pseudo_labels.py --config configs/vpl/voc.yaml \\
      clip.weights=/weights/ViT-B-16.pt data.root=/data/VOCdevkit/VOC2012 cam.prototypes=vision
"""

from __future__ import annotations

import sys

from wsss_ray.config import VPLConfig, run_job


def main(argv: list[str] | None = None) -> int:
    return run_job(VPLConfig, __doc__, "wsss_ray.eval.vpl:run_pseudo_labels", argv)


if __name__ == "__main__":
    sys.exit(main())
