"""The tiny CLIP pretraining job as a user runs it (a subprocess from the repo root), for the
tests that stop, damage and rerun runs."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tiny_clip_job(out: Path, steps: int, *extra: str) -> list[str]:
    """The command line: ``steps`` steps, a checkpoint and a report every 10, 256 images."""
    return [
        sys.executable,
        "jobs/pretrain_clip.py",
        "--config",
        "configs/clip/tiny.yaml",
        f"run.output_dir={out}",
        f"train.max_steps={steps}",
        "train.ckpt_every=10",
        "train.log_every=10",
        "data.synthetic.num_images=256",
        *extra,
    ]
