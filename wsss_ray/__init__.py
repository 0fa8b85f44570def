"""wsss_ray: PGSeg and VPL training, evaluation and inference on Ray.

``from wsss_ray import Segmenter`` is the entry for using a trained model
(:mod:`wsss_ray.inference.segmenter`); it is imported on first use, so ``import wsss_ray``
stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Segmenter"]


def __getattr__(name: str) -> Any:
    if name == "Segmenter":
        from wsss_ray.inference.segmenter import Segmenter

        return Segmenter
    raise AttributeError(f"module 'wsss_ray' has no attribute {name!r}")
