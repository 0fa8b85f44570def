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
  the ZeRO optimizer, which re-partitions the Adam moments and fp32 weights for the new world;
  fewer saved partitions than workers (a one-worker ZeRO run grown) included, which DeepSpeed's
  loader cannot index (it reads the global state of ``state_dict_list[dp_rank]``).
- a stage-0 checkpoint (a fresh one-worker run) resumed by several workers: its optimizer state
  is one torch state dict, per parameter; :func:`_stage0_partition` flattens it in the ZeRO
  optimizer's group order into the one partition an elastic ZeRO checkpoint of one worker would
  hold, and it is re-partitioned like any other. Where the layouts do not match (per-parameter
  alignment padding, other groups) the Adam moments restart, with a warning.
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
            parts = engine._get_all_zero_checkpoints(ckpt_dir, tag)
            if saved != world and isinstance(parts[0][_keys().BASE_OPTIMIZER_STATE], dict):
                raise RuntimeError(
                    f"{ckpt_dir} was written by {saved} workers without elastic checkpoints "
                    f"(an older wsss_ray): resume it with scaling.num_workers={saved}"
                )
            _load_partitions(engine, parts)
            if engine.global_rank == 0 and saved != world:
                workers = f"{saved} worker" + "s" * (saved != 1)
                say(f"[wsss_ray] elastic resume: the ZeRO state of {workers}, for {world}")
        elif path is not None and saved:
            raise RuntimeError(f"{ckpt_dir} holds ZeRO partitions: resume it with ZeRO")
        elif path is not None:  # stage 0 (one worker) resumed with ZeRO
            part = _stage0_partition(engine, os.path.join(ckpt_dir, tag))
            if part is not None:
                _load_partitions(engine, [part])
            if engine.global_rank == 0 and part is not None:
                say(f"[wsss_ray] elastic resume: the stage-0 state of 1 worker, for {world}")
            elif engine.global_rank == 0:
                say(
                    "[wsss_ray] warning: the checkpoint's one-worker (stage-0) optimizer state "
                    "does not match this optimizer's groups: the Adam moments restart"
                )
    if path is None:
        raise RuntimeError(f"could not load the DeepSpeed checkpoint in {ckpt_dir}")
    return client


def _keys() -> Any:
    from deepspeed.checkpoint import constants

    return constants


class _SavedParts(list):
    """The saved partitions, as DeepSpeed's ZeRO loader reads them: it merges all of them, and
    takes the global state (loss scaler, clipping, version: the same in every partition) from
    index ``dp_rank``, which is past the end when the checkpoint has fewer partitions than this
    run has workers; such an index reads the last partition."""

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, int) and i >= len(self):
            i = len(self) - 1
        return super().__getitem__(i)


def _load_partitions(engine: Any, parts: list[dict]) -> None:
    """Hand saved elastic ZeRO partitions (any number) to the engine's ZeRO optimizer, which
    merges them and takes this rank's share; then the learning rate the scheduler reached."""
    k = _keys()
    for sd in parts:  # torch AdamW keeps its step per parameter, in the state itself
        sd.setdefault(k.BASE_OPTIMIZER_STATE_STEP, None)
    opt = engine.optimizer
    opt.load_state_dict(
        state_dict_list=_SavedParts(parts),
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


def _stage0_partition(engine: Any, folder: str) -> dict | None:
    """The stage-0 checkpoint's optimizer state (``mp_rank_00_model_states.pt``: a torch
    AdamW state dict, per parameter) as the one partition an elastic ZeRO-1/2 checkpoint of one
    worker holds: per group, each state tensor flattened in the ZeRO optimizer's parameter
    order, unpadded, and the group's fp32 weights likewise (from the saved module, so a bf16
    run that resumes it keeps them exact). None when the groups or the parameter shapes differ,
    or ZeRO pads each parameter."""
    import torch

    k = _keys()
    opt = engine.optimizer
    files = glob.glob(os.path.join(folder, "mp_rank_00_model_states.pt"))
    if not files or not hasattr(opt, "round_robin_bit16_groups"):
        return None
    # our own checkpoint (its manifest verified before the resume); DeepSpeed loads it so too
    ckpt = torch.load(files[0], map_location="cpu", weights_only=False)
    saved, module = ckpt.get("optimizer"), ckpt.get("module") or {}
    names = {id(p): n for n, p in engine.module.named_parameters()}
    current = opt.state_dict()  # this run's global state: loss scaler, clipping, paddings
    pads = current.get(k.PARAM_ALIGNMENT_PADDINGS) or []
    groups = opt.round_robin_bit16_groups
    if not saved or len(saved.get("param_groups", [])) != len(groups) or any(map(any, pads)):
        return None
    states, fp32 = [], []
    for params, group in zip(groups, saved["param_groups"]):
        per_param = [saved["state"].get(i) for i in group["params"]]
        if len(per_param) != len(params) or any(
            s is None or s.get("exp_avg") is None or s["exp_avg"].shape != p.shape
            for s, p in zip(per_param, params)
        ):
            return None
        state = {}
        for key, first in per_param[0].items():
            if torch.is_tensor(first) and first.dim() > 0:
                state[key] = torch.cat([s[key].reshape(-1).float() for s in per_param])
            else:
                state[key] = first  # the step: the same for every parameter
        states.append(state)
        weights = [module.get(names.get(id(p)), p).detach() for p in params]
        fp32.append(torch.cat([w.reshape(-1).float().cpu() for w in weights]))
    return {
        **current,
        k.BASE_OPTIMIZER_STATE: states,
        k.SINGLE_PARTITION_OF_FP32_GROUPS: fp32,
        k.BASE_OPTIMIZER_STATE_STEP: None,
        k.PARTITION_COUNT: 1,
    }
