"""Ray Tune sweeps around the drivers (issue 7): search spaces declared in YAML
(``configs/sweeps/``), Optuna search + ASHA early stopping, one MLflow parent run per sweep and a
child per trial, and the best trial's resolved config exported for the method's job.

- ``spec``: the sweep file format, its checks (before Ray starts) and the Tune space.
- ``trials``: what one trial runs: a Ray Train fit with ``TuneReportCallback`` (PGSeg, VPL
  phase 2) or a prototype solve on cached features (VPL phase 1).
- ``sweep``: ``run_sweep``: preparation, concurrency, MLflow, the Tuner, tables, best config.
"""

from wsss_ray.tune.spec import SweepError, SweepSpec, load_sweep

__all__ = ["SweepError", "SweepSpec", "load_sweep", "run_sweep"]


def run_sweep(spec: SweepSpec):  # noqa: ANN201 - lazy: keeps `import wsss_ray.tune` Ray-free
    from wsss_ray.tune.sweep import run_sweep as _run

    return _run(spec)
