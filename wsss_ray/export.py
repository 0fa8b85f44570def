"""Our PGSeg checkpoints in the released GroupViT / PGSeg layout (``jobs/export_checkpoint.py``).

The layout mapping itself is :func:`wsss_ray.models.pgseg.export_reference_state`; this module
reads the checkpoint (run folder, checkpoint folder, .pt), picks the layout and writes the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from wsss_ray.config import ExportConfig


def export_checkpoint(cfg: ExportConfig) -> Path:
    from wsss_ray.eval.checkpoint import load_state_dict
    from wsss_ray.models.pgseg import export_reference_state, load_for_inference

    m = cfg.model
    model, _ = load_for_inference(m.size, load_state_dict(m.checkpoint), m.text_act, m.checkpoint)
    has_npr = model.img_encoder.layers[0].recon is not None
    layout = cfg.layout if cfg.layout != "auto" else ("pgseg" if has_npr else "groupvit")
    if layout == "pgseg" and not has_npr:
        raise ValueError("layout=pgseg needs a model trained with NPR (npr.enabled=true)")
    if layout == "groupvit":
        if has_npr:
            print(
                "[wsss_ray] warning: layout=groupvit drops the NPR reconstruction this model adds "
                "at inference; the reference GroupViT will not compute the same outputs",
                flush=True,
            )
        model = _without_npr(model, m.size, m.text_act)  # and without text prototypes
    if m.text_act != "quick_gelu":
        print(
            "[wsss_ray] warning: model.text_act=gelu; the reference text tower is QuickGELU, so "
            "its text features will differ",
            flush=True,
        )
    state = export_reference_state(model)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save({"model": state}, tmp)
    os.replace(tmp, out)
    print(f"[wsss_ray] exported {len(state)} tensors in the {layout} layout to {out}", flush=True)
    return out


def _without_npr(model, size: str, text_act: str):
    from wsss_ray.models.pgseg import PGSeg

    multi_label = int(hasattr(model, "multi_label_logit_scale"))
    bare = PGSeg(
        size, npr_enabled=False, text_mode="none", text_act=text_act, multi_label=multi_label
    )
    own = bare.state_dict()
    bare.load_state_dict({k: v for k, v in model.state_dict().items() if k in own}, strict=True)
    return bare.eval()
