"""Hyperparameter sweeps on Ray Tune: Optuna search + ASHA early stopping over a method's job
config, one MLflow parent run per sweep and a child run per trial; the best trial's resolved
config is written to <output_dir>/<name>/best_config.yaml, which the method's job accepts
unchanged (python jobs/pretrain_pgseg.py --config .../best_config.yaml).

  python jobs/sweep.py --sweep configs/sweeps/pgseg.yaml                 # PGSeg pretraining
  python jobs/sweep.py --sweep configs/sweeps/vpl.yaml \\
      fixed.clip.weights=outputs/demo/ray_results/clip_tiny               # VPL phase 1 (W)
  python jobs/sweep.py --sweep configs/sweeps/vpl.yaml stage=seeds       # W + CAM thresholds
  python jobs/sweep.py --sweep configs/sweeps/vpl.yaml stage=decoder     # VPL phase 2
  python jobs/sweep.py --sweep configs/sweeps/pgseg.yaml num_samples=4 output_dir=/tmp/s

Overrides (key=value) apply to the sweep file: name, num_samples, metric, mode, concurrency,
output_dir, scheduler.max_t, searcher.seed, fixed.<config key>=..., parameters.<key>.<dist>=...,
stage=<name> for files with stages. A parameter or fixed key the job's config does not have
stops the sweep before Ray starts, with one line naming it (exit status 2). Docs: docs/SWEEPS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wsss_ray.config import ConfigError, add_verbose_flag


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sweep", required=True, help="sweep YAML (configs/sweeps/*.yaml)")
    parser.add_argument(
        "--print-sweep", action="store_true", help="print the resolved sweep and exit"
    )
    add_verbose_flag(parser)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    from wsss_ray.console import LOG_NAME, configure
    from wsss_ray.tune import load_sweep, run_sweep
    from wsss_ray.tune.spec import spec_yaml

    try:
        spec = load_sweep(args.sweep, args.overrides)
    except ConfigError as err:
        print(str(err), file=sys.stderr)
        return 2
    if args.print_sweep:
        print(spec_yaml(spec))
        return 0
    # the sweep prints a line per trial; the trials' own step lines go to the file
    configure(args.verbose, Path(spec.output_dir) / spec.name / LOG_NAME, worker_lines=False)
    try:
        result = run_sweep(spec)
    except ConfigError as err:  # checks that need the resolved base config
        print(str(err), file=sys.stderr)
        return 2
    return 0 if result.best is not None else 1


if __name__ == "__main__":
    sys.exit(main())
