"""Pretrain PGSeg (GroupViT + prototype guidance) on WebDataset image-text shards with Ray Train
and DeepSpeed. With no shards configured it trains the tiny PGSeg on synthetic shapes on an
embedded local Ray. Examples:

    python jobs/pretrain_pgseg.py                                   # tiny, synthetic, local
    python jobs/pretrain_pgseg.py --config configs/pgseg/vit_s_24m.yaml data.train_shards=[...]
    ray job submit -- python jobs/pretrain_pgseg.py --config configs/pgseg/vit_s_24m.yaml ...
"""

from __future__ import annotations

import sys

from wsss_ray.config import PGSegPretrainConfig, parse_job_args
from wsss_ray.train.driver import train_job


def main(argv: list[str] | None = None) -> int:
    cfg = parse_job_args(
        PGSegPretrainConfig, __doc__, argv, default_config="configs/pgseg/tiny.yaml"
    )
    return train_job(cfg)[0]


if __name__ == "__main__":
    sys.exit(main())
