"""The data hooks of the image-text tasks (CLIP, PGSeg): WebDataset shards (synthetic ones when
none are given) streamed by the Ray Data image-text pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wsss_ray.tasks.registry import TrainData, spec_for


def train_shards(cfg: Any) -> list[str]:
    """``data.train_shards`` expanded (folders and globs -> tar paths; object-store entries as
    given), or the synthetic shapes world written once under the output folder."""
    if cfg.data.train_shards:
        from wsss_ray.config.common import expand_paths

        return expand_paths("data.train_shards", list(cfg.data.train_shards))
    from wsss_ray.data.synthetic import ensure_synthetic_shards

    syn = cfg.data.synthetic
    folder = Path(cfg.run.output_dir).resolve() / "synthetic_shards"
    print(
        f"[wsss_ray] no data.train_shards given: using {syn.num_images} synthetic images "
        f"in {folder}",
        flush=True,
    )
    return ensure_synthetic_shards(
        folder, syn.num_images, syn.seed, syn.image_size, syn.samples_per_shard
    )


def prepare(cfg: Any, output_dir: Path) -> TrainData:
    return TrainData(shards=train_shards(cfg))


def datasets(cfg: Any, data: TrainData, skip_counter: str | None = None) -> dict:
    from wsss_ray.data.webdataset import image_text_dataset

    d = cfg.data
    name, context_length = spec_for(cfg).hook("tokenizer")(cfg)
    loss = getattr(cfg, "loss", None)
    train = image_text_dataset(
        data.shards,
        name,
        d.image_size,
        tuple(d.crop_scale),
        d.hflip,
        d.decode_batch_size,
        tuple(d.decode_actors),
        d.cpus_per_decode_actor,
        context_length,
        skip_counter,
        decode_device=d.decode_device,
        reader=d.reader,
        passes=d.passes_per_execution,
        multi_label=getattr(loss, "multi_label", 0),
        noun_tagger=getattr(loss, "noun_tagger", "nltk"),
        seed=cfg.train.seed,
        plan=data.data_plan,
    )
    return {"train": train}
