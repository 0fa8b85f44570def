"""Export a PGSeg checkpoint trained here to the released GroupViT / PGSeg layout, so the
reference evaluation code (GroupViT's or PGSeg's ``main_seg.py``) runs it unchanged.

  python jobs/export_checkpoint.py model.size=vit_s \\
      model.checkpoint=outputs/ray_results/pgseg_vit_s_24m out=pgseg_ours.pth
  python jobs/export_checkpoint.py --config configs/pgseg/eval_tiny.yaml \\
      model.checkpoint=outputs/demo/ray_results/pgseg_tiny out=/tmp/tiny.pth layout=groupvit

model.checkpoint: a run folder (newest checkpoint), a checkpoint folder (ZeRO shards merged) or a
.pt file. Writes ``{"model": state_dict}`` (what GroupViT's ``load_checkpoint`` reads): projector
weights as Conv1d ``[out, in, 1]``, 0-d logit scales, PGSeg's NPR as ``downsample_spatial``
(``mu`` and ``mapping_x``; needs ``npr.reconstruction: reference``) and ``text_encoder.Atten.mu``.
layout=groupvit drops the NPR modules: the reference GroupViT has none, so its outputs then differ
from ours when the model was trained with NPR (a warning says so). The text tower must be
QuickGELU (``model.text_act``) for the reference to compute the same features.
Prints the tensor count and the file; exit status 2 on config or checkpoint errors.
"""

from __future__ import annotations

import sys

from wsss_ray.config import ExportConfig, parse_job_args


def main(argv: list[str] | None = None) -> int:
    cfg = parse_job_args(ExportConfig, __doc__, argv)
    from wsss_ray.export import export_checkpoint

    try:
        export_checkpoint(cfg)
    except ValueError as err:  # PartialCheckpointError, a layout the model cannot take
        print(f"export error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
