"""One task per method: ``training_forward(batch) -> (losses, metrics)``; one loop serves all."""

from __future__ import annotations

from typing import Any

from wsss_ray.config import ConfigError
from wsss_ray.tasks.base import Task


def build_task(cfg: Any, **task_args: Any) -> Task:
    """The task named by ``cfg.task``, built from its config (inside a worker: after the process
    group exists, so distributed losses see the right rank); ``task_args`` are what the driver
    learned from the data (e.g. ``num_classes``)."""
    if cfg.task == "clip":
        from wsss_ray.tasks.clip import ClipTask

        return ClipTask(cfg)
    if cfg.task == "pgseg":
        from wsss_ray.tasks.pgseg import PGSegTask

        return PGSegTask(cfg)
    if cfg.task == "vpl_seg":
        from wsss_ray.tasks.vpl import VPLSegTask

        return VPLSegTask(cfg, **task_args)
    raise ValueError(f"unknown task '{cfg.task}'")


def tokenizer_spec(cfg: Any) -> tuple[str, int | None]:
    """(open_clip tokenizer name, context length) for this task's text tower."""
    if cfg.task == "pgseg":
        from wsss_ray.models.pgseg import SIZES

        return "ViT-B-16", SIZES[cfg.model.size].context_length  # CLIP BPE
    return cfg.model.name, None


def check_config(cfg: Any) -> None:
    """Task-level checks that need the model registry; raise ConfigError before Ray starts."""
    if cfg.task == "clip":
        from wsss_ray.models.clip import image_size, model_config

        try:
            model_config(cfg.model.name)
        except KeyError as err:
            raise ConfigError(f"config error: model.name: {err.args[0]}") from None
        want = image_size(cfg.model.name)
        if cfg.data.image_size != want:
            raise ConfigError(
                f"config error: data.image_size: {cfg.model.name} takes {want}px "
                f"inputs, got {cfg.data.image_size}"
            )
    elif cfg.task == "pgseg":
        from wsss_ray.models.pgseg import SIZES

        if cfg.model.size not in SIZES:
            raise ConfigError(
                f"config error: model.size: unknown size '{cfg.model.size}' "
                f"(known: {', '.join(sorted(SIZES))})"
            )
        want = SIZES[cfg.model.size].image_size
        if cfg.data.image_size != want:
            raise ConfigError(
                f"config error: data.image_size: PGSeg {cfg.model.size} takes "
                f"{want}px inputs, got {cfg.data.image_size}"
            )
        if cfg.npr.text_mode not in ("tokens", "reference", "none"):
            raise ConfigError("config error: npr.text_mode: tokens | reference | none")
        if cfg.loss.multi_label < 0:
            raise ConfigError("config error: loss.multi_label: must be >= 0")
        if cfg.loss.noun_tagger not in ("nltk", "words"):
            raise ConfigError("config error: loss.noun_tagger: nltk | words")
        if cfg.loss.multi_label and cfg.loss.noun_tagger == "nltk":
            from wsss_ray.data.nouns import nltk_ready

            missing = nltk_ready()
            if missing:
                raise ConfigError(
                    "config error: loss.noun_tagger: nltk (GroupViT's tagger) is not usable "
                    f"offline here: {missing}; or loss.noun_tagger=words"
                )
        if cfg.model.pretrained:  # a checkpoint that does not fit fails here, not in a worker
            from wsss_ray.models.pgseg import PartialCheckpointError
            from wsss_ray.tasks.pgseg import build_pgseg, load_pretrained

            try:
                load_pretrained(
                    build_pgseg(cfg), cfg.model.pretrained, cfg.model.allow_partial_init
                )
            except PartialCheckpointError as err:
                raise ConfigError(f"config error: model.pretrained: {err}") from None
    elif cfg.task == "vpl_seg":
        from wsss_ray.models.clip import model_config

        try:
            patch = model_config(cfg.clip.name)["vision_cfg"].get("patch_size", 16)
        except KeyError as err:
            raise ConfigError(f"config error: clip.name: {err.args[0]}") from None
        if cfg.data.crop_size % patch:
            raise ConfigError(
                f"config error: data.crop_size: {cfg.data.crop_size} is not a multiple of "
                f"{cfg.clip.name}'s patch size {patch}"
            )
    else:
        raise ConfigError(f"config error: task: unknown task '{cfg.task}'")
