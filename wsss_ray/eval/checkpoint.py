"""Model weights out of training checkpoints, for evaluation and inference.

Accepts what users have at hand:
- a Ray Train run folder (``<storage>/<name>``): its newest ``checkpoint_step_*`` is used;
- one Ray checkpoint folder (holding the DeepSpeed tag folder ``ckpt/``): ZeRO shards are merged
  into fp32 weights with DeepSpeed's ``zero_to_fp32``; without ZeRO optimizer shards the module
  weights of ``mp_rank_00_model_states.pt`` are used;
- a plain ``.pt``/``.pth`` file (a state dict, or GroupViT-style ``{"model": ...}``).
Task wrappers' prefixes (``model.``, ``module.``) are stripped.
"""

from __future__ import annotations

import glob
import os

import torch

#: the DeepSpeed tag every training checkpoint is written under
CKPT_TAG = "ckpt"


def latest_checkpoint(path: str) -> str:
    """``path`` itself when it is a checkpoint (or file), else its newest checkpoint_step_*."""
    if os.path.isfile(path) or os.path.isdir(os.path.join(path, CKPT_TAG)):
        return path
    found = sorted(glob.glob(os.path.join(path, "checkpoint_step_*")))
    found = [f for f in found if os.path.isdir(os.path.join(f, CKPT_TAG))]
    if not found:
        raise FileNotFoundError(
            f"no checkpoint at {path} (want a Ray run folder with checkpoint_step_*, "
            "a checkpoint folder with ckpt/, or a .pt file)"
        )
    return found[-1]


def _deepspeed_state(ckpt_dir: str) -> dict[str, torch.Tensor]:
    tag_dir = os.path.join(ckpt_dir, CKPT_TAG)
    if glob.glob(os.path.join(tag_dir, "*zero_pp_rank_*optim_states.pt")):
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=CKPT_TAG)
    states = sorted(glob.glob(os.path.join(tag_dir, "mp_rank_*_model_states.pt")))
    if not states:
        raise FileNotFoundError(f"no DeepSpeed model states in {tag_dir}")
    return torch.load(states[0], map_location="cpu", weights_only=True)["module"]


def load_state_dict(path: str, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """A float state dict for the inner model from any supported checkpoint form."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    path = latest_checkpoint(path)
    if os.path.isfile(path):
        from wsss_ray.models.pgseg import read_checkpoint_file

        state = read_checkpoint_file(path)
    else:
        state = _deepspeed_state(path)
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if prefix and key.startswith(prefix):
            key = key[len(prefix) :]
        elif prefix and any(k.startswith(prefix) for k in state):
            continue  # the task's own losses etc.: not part of the model
        out[key] = value.float() if value.is_floating_point() else value
    return out
