"""Resuming a DeepSpeed checkpoint with another number of workers (elastic resume).

DeepSpeed refuses to load ZeRO optimizer partitions written by another data-parallel world size
("Automatic adjustment of ZeRO's optimizer state partitioning with a new world size is not
currently supported", ``DeepSpeedEngine._load_zero_checkpoint``), although its ZeRO-1/2
optimizer can merge and re-partition them when they were saved with
``zero_optimization.elastic_checkpoint`` (``_restore_elastic_base_optimizer_state``). So:

- every ZeRO-1/2 run saves elastic checkpoints (:func:`wsss_ray.train.deepspeed_config`);
- a resume reads the checkpoint's layout first (:func:`saved_layout`): a ZeRO checkpoint keeps
  ZeRO even for one worker (whose fresh runs use stage 0, which has no partitions);
- :func:`load_engine_state` loads as DeepSpeed does when the world size is the one saved;
  otherwise the module, the scheduler and the client state, then every saved partition handed to
  the ZeRO optimizer, which re-partitions the Adam moments and fp32 weights for the new world.
  A stage-0 checkpoint (one worker) resumed by several workers restarts the Adam moments, with a
  warning: its optimizer state is one torch state dict, not partitions.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from typing import Any

ZERO_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_?optim_states\.pt$")


@dataclass(frozen=True)
class Layout:
    """What a checkpoint holds: ``zero_ranks`` ZeRO optimizer partitions (0: stage 0)."""

    zero_ranks: int

    @property
    def zero(self) -> bool:
        return self.zero_ranks > 0


def _zero_ranks(names: list[str]) -> int:
    return len({m.group(1) for n in names if (m := ZERO_FILE.search(n))})


def saved_layout(checkpoint: Any) -> Layout | None:
    """The layout of a Ray Train checkpoint, read from its file listing (nothing downloaded);
    None without a checkpoint."""
    if checkpoint is None:
        return None
    import pyarrow.fs as pafs

    infos = checkpoint.filesystem.get_file_info(
        pafs.FileSelector(checkpoint.path, recursive=True, allow_not_found=True)
    )
    return Layout(_zero_ranks([i.path for i in infos]))


def load_engine_state(engine: Any, ckpt_dir: str, tag: str, say: Any = print) -> dict:
    """Load a DeepSpeed checkpoint into ``engine`` whatever world size wrote it; returns the
    client state. Raises when nothing can be loaded."""
    world = engine.dp_world_size if hasattr(engine, "dp_world_size") else 1
    saved = _zero_ranks(glob.glob(os.path.join(ckpt_dir, tag, "*optim_states.pt")))
    zero = bool(engine.zero_optimization())
    if not zero and not saved:
        path, client = engine.load_checkpoint(ckpt_dir, tag=tag)
    else:
        path, client = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=False)
        if path is not None and zero and saved:
            opt = engine.optimizer
            from deepspeed.checkpoint.constants import (
                BASE_OPTIMIZER_STATE,
                BASE_OPTIMIZER_STATE_STEP,
            )

            parts = engine._get_all_zero_checkpoints(ckpt_dir, tag)
            if saved != world and isinstance(parts[0][BASE_OPTIMIZER_STATE], dict):
                raise RuntimeError(
                    f"{ckpt_dir} was written by {saved} workers without elastic checkpoints "
                    f"(an older wsss_ray): resume it with scaling.num_workers={saved}"
                )
            for sd in parts:  # torch AdamW keeps its step per parameter, in the state itself
                sd.setdefault(BASE_OPTIMIZER_STATE_STEP, None)
            opt.load_state_dict(
                state_dict_list=parts,
                load_optimizer_states=True,
                load_from_fp32_weights=engine.zero_load_from_fp32_weights(),
                checkpoint_folder=None,
                param_shapes=engine._get_zero_param_shapes(),
            )
            # the partitions carry the Adam state, not the param groups: the learning rate the
            # scheduler reached (DeepSpeed's own load restores it with the groups)
            if engine.lr_scheduler is not None:
                for group, lr in zip(opt.param_groups, engine.lr_scheduler.get_last_lr()):
                    group["lr"] = lr
            if engine.global_rank == 0 and saved != world:
                say(f"[wsss_ray] elastic resume: the ZeRO state of {saved} workers, for {world}")
        elif path is not None and saved:
            raise RuntimeError(f"{ckpt_dir} holds ZeRO partitions: resume it with ZeRO")
        elif path is not None and engine.global_rank == 0:
            say(
                f"[wsss_ray] warning: the checkpoint holds one worker's (stage-0) optimizer "
                f"state, which cannot be split across {world} workers: the Adam moments restart"
            )
    if path is None:
        raise RuntimeError(f"could not load the DeepSpeed checkpoint in {ckpt_dir}")
    return client
