"""Shared pieces of the config schemas: the normalisation constants, the error type, the field
helper and :func:`need`, the one-line check every section's ``check`` uses."""

from __future__ import annotations

from dataclasses import field
from typing import Any

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
#: GroupViT / PGSeg normalise with ImageNet's statistics in training and zero-shot evaluation
#: (their configs' img_norm_cfg; docs/FIDELITY.md); CLIP's are for CLIP towers only
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class ConfigError(ValueError):
    """A configuration problem, reported to the user as one line naming the key."""


def _f(default: Any, help: str) -> Any:  # noqa: A002 - mirrors argparse's name
    """A dataclass field with a help string (shown by ``--help`` and in docs/CONFIG.md)."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def need(cond: bool, key: str, msg: str) -> None:
    """Raise the one-line ConfigError ``config error: <key>: <msg>`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"config error: {key}: {msg}")


def crf_needed(key: str) -> None:
    from wsss_ray.ops.crf import crf_available

    need(crf_available(), key, "needs pydensecrf: pip install -e '.[crf]'")
