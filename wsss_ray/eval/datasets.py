"""The evaluation/validation set a config names: a real VOC / COCO / Context split, or the
synthetic VOC-layout shapes set generated once under the output folder (disjoint from the
pretraining shards: its own seed)."""

from __future__ import annotations

import json
from pathlib import Path

from wsss_ray.config import SegDataConfig


def ensure_synthetic_voc(folder: str | Path, num_train: int, num_val: int, seed: int, size: int):
    """Write the synthetic VOC2012 layout once; reuse it when the same settings exist."""
    from wsss_ray.data.synthetic import GENERATOR_VERSION, write_voc

    folder = Path(folder)
    stamp = folder / "SETTINGS.json"
    settings = {
        "version": GENERATOR_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "seed": seed,
        "size": size,
    }
    if stamp.exists() and json.loads(stamp.read_text()) == settings:
        return folder
    write_voc(folder, num_train, num_val, seed, size)
    stamp.write_text(json.dumps(settings))
    return folder


def resolve_source(data: SegDataConfig, output_dir: str | Path):
    """A ``SegSource`` for ``data`` (first ``max_images`` records when set)."""
    from wsss_ray.data.segmentation import open_source

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
    source = open_source(data.kind, root, data.split)
    if data.max_images:
        source.records = source.records[: data.max_images]
    return source
