"""Pretrain a CLIP (any open_clip architecture) on WebDataset image-text shards with Ray Train
and DeepSpeed. With no shards configured it trains the tiny CLIP on synthetic shapes on an
embedded local Ray. Example:

    python jobs/pretrain_clip.py --config configs/clip/tiny.yaml train.max_steps=50
"""

from __future__ import annotations

import sys

from wsss_ray.config import ClipPretrainConfig, parse_job_args
from wsss_ray.train.driver import train_job


def main(argv: list[str] | None = None) -> int:
    cfg = parse_job_args(ClipPretrainConfig, __doc__, argv, default_config="configs/clip/tiny.yaml")
    return train_job(cfg)[0]


if __name__ == "__main__":
    sys.exit(main())
