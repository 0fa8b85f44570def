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

What the job's console shows once Ray is up is :mod:`wsss_ray.console`'s business: when the job
asked for a quiet console (the default of every job; ``--verbose`` turns it off), the driver's
INFO logs and Ray's stream of worker lines are routed to ``console.log`` in the run's folder,
set up here around ``ray.init``.
"""

from __future__ import annotations

import math
import os


def start_ray(needed_cpus: float, num_cpus: int = 0) -> None:
    """Join or start Ray. ``num_cpus`` (embedded only) overrides the logical CPU count."""
    import ray
    from ray.data import DataContext

    from wsss_ray import console

    DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        return
    env = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "PYTHONWARNINGS": "ignore::FutureWarning"}
    if os.environ.get("WSSS_TRUST_PICKLE"):  # the opt-in reaches the workers that load files
        env["WSSS_TRUST_PICKLE"] = os.environ["WSSS_TRUST_PICKLE"]
    os.environ.update(env)
    quiet = console.is_quiet()
    if quiet:
        os.environ.update(console.ray_env())
        console.quiet_driver_logs()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env={"env_vars": env})
    else:
        num_cpus = num_cpus or max(os.cpu_count() or 1, math.ceil(needed_cpus))
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=embedded_runtime_env(env))
    if quiet and console.filter_ray_output():
        console.announce()


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


def _fits(node: dict[str, float], bundle: dict[str, float]) -> int:
    """How many ``bundle``s one node's total resources hold."""
    need = {k: v for k, v in bundle.items() if v > 0}
    return min((int(node.get(k, 0.0) // v) for k, v in need.items()), default=0)


def resource_shortfall(
    bundle: dict[str, float], count: int, extra_cpus: float = 0.0, nodes: list | None = None
) -> str | None:
    """Why ``count`` train workers of ``bundle`` each (plus ``extra_cpus`` for the decode
    actors) cannot all be placed on the cluster's live nodes, or None when they can. Compares
    with the nodes' total resources, so a busy cluster is not "infeasible", only a small one."""
    import ray

    if nodes is None:
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    want = ", ".join(f"{k} {v:g}" for k, v in sorted(bundle.items()) if v > 0)
    have = sorted(
        {", ".join(f"{k} {v:g}" for k, v in sorted(n.items()) if k in bundle) for n in nodes}
    )
    slots = sum(_fits(n, bundle) for n in nodes)
    if slots == 0:
        return (
            f"scaling: a train worker needs {{{want}}}, and no node of this Ray cluster has that "
            f"much (nodes: {'; '.join(have) or 'none'}); change scaling.* or the cluster"
        )
    if slots < count:
        return (
            f"scaling: {count} train workers need {{{want}}} each; this Ray cluster has room for "
            f"{slots} (scaling.num_workers={slots} would fit)"
        )
    total_cpus = sum(n.get("CPU", 0.0) for n in nodes)
    cpus = count * bundle.get("CPU", 0.0) + extra_cpus
    if cpus > total_cpus:
        return (
            f"scaling: {count} train workers x {bundle.get('CPU', 0):g} CPUs + {extra_cpus:g} for "
            f"the minimum decode actors = {cpus:g} CPUs; this Ray cluster has {total_cpus:g}"
        )
    return None


def wait_for_resources(
    bundle: dict[str, float],
    count: int,
    extra_cpus: float,
    timeout_s: float,
    poll_s: float = 5.0,
    log=print,
) -> None:
    """Return when the cluster can hold the job; else raise ``ConfigError`` with the reason:
    at once on the embedded local Ray (it cannot grow), after ``timeout_s`` on a joined cluster
    (an autoscaler may be adding nodes). Ray Train itself would retry the worker group forever."""
    import time

    from wsss_ray.config import ConfigError

    why = resource_shortfall(bundle, count, extra_cpus)
    if why is None:
        return
    if not os.environ.get("RAY_ADDRESS") or timeout_s <= 0:
        raise ConfigError(f"config error: {why}")
    log(f"[wsss_ray] waiting up to {timeout_s:.0f}s for the cluster to grow: {why}")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
        why = resource_shortfall(bundle, count, extra_cpus)
        if why is None:
            return
    raise ConfigError(f"config error: {why} (waited {timeout_s:.0f}s: scaling.startup_timeout_s)")
