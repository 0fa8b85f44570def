"""The evaluation/validation set a config names: a real VOC / COCO / Context split, or the
synthetic VOC-layout shapes set generated once under the output folder (disjoint from the
pretraining shards: its own seed)."""

from __future__ import annotations

from pathlib import Path

from wsss_ray.config import SegDataConfig


def resolve_source(data: SegDataConfig, output_dir: str | Path):
    """A ``SegSource`` for ``data`` (first ``max_images`` records when set)."""
    from wsss_ray.data.segmentation import open_source
    from wsss_ray.data.synthetic import ensure_synthetic_voc

    root = data.root
    if not root:
        syn = data.synthetic
        root = str(
            ensure_synthetic_voc(
                Path(output_dir).resolve() / "synthetic_voc" / "VOC2012",
                syn.num_train,
                syn.num_val,
                syn.seed,
                syn.image_size,
            )
        )
    kwargs = {"source": data.gt} if data.kind == "coco_object" else {}
    source = open_source(data.kind, root, data.split, **kwargs)
    if data.max_images:
        source.records = source.records[: data.max_images]
    return source
