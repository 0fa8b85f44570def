"""Starting or joining Ray, the same way for every job.

``RAY_ADDRESS`` set (a cluster, or ``ray job submit``): join it. Otherwise start an embedded
local Ray with enough logical CPUs for what the job will schedule. Ray Data's progress bars are
off: our jobs print their own progress lines, which the bars would drown.

The embedded Ray runs without the dashboard (less memory and start-up on a laptop), so Ray's
State API is absent there; Ray Train's ``PlacementGroupCleaner`` actor asks it once a second
whether the controller is alive and logs a warning on every failure (hundreds of lines per
demo). Its workers run :func:`quiet_state_api_warnings`, which raises that one logger to ERROR;
the cleaner's actual job (removing a dead controller's placement group) matters on a cluster,
where the dashboard is up and nothing is silenced.
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
    ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=embedded_runtime_env(env))


def embedded_runtime_env(env_vars: dict[str, str]) -> dict:
    """The job runtime env of a Ray started without the dashboard: ``env_vars`` for every
    worker, and :func:`quiet_state_api_warnings` run in each worker process."""
    return {"env_vars": dict(env_vars), "worker_process_setup_hook": quiet_state_api_warnings}


#: the logger of Ray Train's PlacementGroupCleaner (see the module docstring)
PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_state_api_warnings() -> None:
    """Worker setup hook of the embedded Ray (no dashboard, so no State API): silence the
    PlacementGroupCleaner's once-a-second "Failed to query ... State API" warning."""
    import logging

    logging.getLogger(PG_CLEANER_LOGGER).setLevel(logging.ERROR)


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
