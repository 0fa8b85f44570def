"""Starting or joining Ray, the same way for every job.

``RAY_ADDRESS`` set (a cluster, or ``ray job submit``): join it. Otherwise start an embedded
local Ray with enough logical CPUs for what the job will schedule. Ray Data's progress bars are
off: our jobs print their own progress lines, which the bars would drown.
"""

from __future__ import annotations

import math
import os


def start_ray(needed_cpus: float, num_cpus: int = 0) -> None:
    """Join or start Ray. ``num_cpus`` (embedded only) overrides the logical CPU count."""
    import ray
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        return
    env = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "PYTHONWARNINGS": "ignore::FutureWarning"}
    os.environ.update(env)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env={"env_vars": env})
        return
    num_cpus = num_cpus or max(os.cpu_count() or 1, math.ceil(needed_cpus))
    ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": env})


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
