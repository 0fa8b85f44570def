"""Run a sweep: Optuna (or random) search + ASHA (or FIFO) on Ray Tune, tracked in MLflow.

``run_sweep(spec)`` (``jobs/sweep.py``):

1. Resolves the base job config with the sweep's fixed keys (paths made absolute, so trials do
   not depend on a working directory), and for a ``val/*`` metric makes every report validate
   (``eval.every = train.log_every``), since ASHA compares trials at every report.
2. Prepares what all trials share, once: synthetic shards / validation sets for Train methods;
   for VPL phase 1 the dense CLIP features (``cache_features``), put in the object store.
3. Opens one MLflow parent run (the spec, the space, later the best trial and the tables);
   Train trials open their own child runs, phase-1 children are written by the driver (one
   writer for hundreds of small runs), all tagged ``mlflow.parentRunId``.
4. Runs ``tune.Tuner`` with concurrency = cluster resources / one trial's resources, prints a
   line per finished trial and the best so far, then a table, and writes
   ``<output_dir>/<name>/best_config.yaml``: the best trial's resolved job config, accepted
   unchanged by the method's job (``--config best_config.yaml``), also logged to the parent.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsss_ray.config import load_config, to_yaml
from wsss_ray.tune.runs import (  # noqa: F401 - re-exported for callers of this module
    TUNE_BOOKKEEPING,
    ChildRuns,
    PlacementGroupJanitor,
    TrialRow,
    _better,
    _fmt,
    _plain,
    pick_best,
    say,
    table,
    write_trials_csv,
)
from wsss_ray.tune.spec import (
    SweepError,
    SweepSpec,
    describe_space,
    override,
    spec_yaml,
    tune_space,
)
from wsss_ray.tune.trials import (
    TrialContext,
    full_trial_reports,
    prototype_data,
    prototype_trial,
    train_trial,
    trial_config,
)

#: config keys holding local paths; relative ones are made absolute for the trials
PATH_KEYS = (
    "clip.weights",
    "model.pretrained",
    "model.checkpoint",
    "checkpoint",
    "data.root",
    "data.seg.root",
    "eval.data.root",
    "phase1.folder",
    "phase1.prototypes",
    "phase1.labels",
    "cam.prototype_file",
    "run.storage_path",
)
#: default Tune CPU reservation of one trial driver: a Train trial's driver only waits on its
#: Train run (whose workers reserve their own CPUs); a phase-1 trial is a CPU-bound solve, and
#: one core each measured best (docs/SWEEPS.md); fractions (trial_cpus) pack more per node
DEFAULT_TRIAL_CPUS = {True: 0.01, False: 1.0}


@dataclass
class SweepResult:
    spec: SweepSpec
    rows: list[TrialRow]
    best: TrialRow | None
    best_config: Path | None
    folder: Path
    max_t: int
    seconds: float
    parent_run_id: str | None
    tracking_uri: str | None

    @property
    def trials_per_s(self) -> float:
        return len(self.rows) / max(self.seconds, 1e-9)


# --------------------------------------------------------------------------------- preparation
def absolute_path_overrides(cfg: Any) -> list[str]:
    """``key=/abs/path`` for every relative local path in ``cfg`` (trials may run elsewhere)."""
    from wsss_ray.config import to_flat_dict

    out = []
    for key, value in to_flat_dict(cfg).items():
        if key not in PATH_KEYS or not isinstance(value, str) or not value:
            continue
        if "://" in value or os.path.isabs(value):
            continue
        if key == "phase1.labels" and value in ("vision", "text"):
            continue
        out.append(override(key, str(Path(value).resolve())))
    return out


def resolve_base(spec: SweepSpec) -> tuple[Any, list[str]]:
    """The base config of every trial and the overrides that produce it from the base file."""
    schema = spec.info.schema
    fixed = spec.fixed_overrides()
    cfg = load_config(schema, spec.base_config, fixed)
    fixed += absolute_path_overrides(cfg)
    if spec.info.train and spec.metric.startswith("val/"):
        t = cfg.train
        if cfg.eval.every != t.log_every:
            say(
                f"metric {spec.metric}: validating at every report (eval.every={t.log_every}, "
                f"was {cfg.eval.every}) so ASHA can compare trials at each one"
            )
            fixed.append(override("eval.every", t.log_every))
        if t.ckpt_every % t.log_every:
            raise SweepError(
                f"sweep error: fixed.train.ckpt_every: must be a multiple of train.log_every "
                f"({t.log_every}) when the metric is {spec.metric} (every report validates)"
            )
    return load_config(schema, spec.base_config, fixed), fixed


def train_trial_cpus(cfg: Any) -> float:
    """Logical CPUs one Train trial occupies: its workers, its decode actors and one read task."""
    d, s = cfg.data, cfg.scaling
    return s.num_workers * s.cpus_per_worker + d.decode_actors[1] * d.cpus_per_decode_actor + 1


def auto_concurrency(per_trial_cpus: float, cfg: Any, train: bool) -> int:
    """Trials that fit the cluster at once: its CPUs (and GPUs) over one trial's."""
    import ray

    res = ray.cluster_resources()
    n = int(res.get("CPU", 1) // max(per_trial_cpus, 1e-9))
    if train and cfg.scaling.use_gpu:
        n = min(n, int(res.get("GPU", 0) // cfg.scaling.num_workers))
    return max(1, n)


def open_parent(spec: SweepSpec, cfg: Any, folder: Path, sweep_file: Path):
    """The sweep's MLflow run (None when the base config turns tracking off)."""
    from wsss_ray.tracking import Tracker, local_artifact_location, tracking_uri

    if not cfg.tracking.enabled:
        return None, None
    uri = tracking_uri(cfg.tracking.uri, spec.output_dir)
    params: dict[str, Any] = {
        "sweep/method": spec.method,
        "sweep/base_config": spec.base_config,
        "sweep/metric": spec.metric,
        "sweep/mode": spec.mode,
        "sweep/num_samples": spec.num_samples,
        "sweep/scheduler": spec.scheduler.kind,
        "sweep/searcher": f"{spec.searcher.kind} (seed {spec.searcher.seed})",
        "sweep/stage": spec.stage,
    }
    if spec.scheduler.kind == "asha":
        s = spec.scheduler
        params["sweep/asha"] = f"grace {s.grace_period}, rf {s.reduction_factor}, max_t {s.max_t}"
    if not spec.info.train:
        params["sweep/score"] = spec.score
    params.update({f"space/{k}": v for k, v in describe_space(spec).items()})
    params.update({f"fixed/{k}": v for k, v in spec.fixed.items()})
    tracker = Tracker.open_run(
        uri,
        cfg.tracking.experiment,
        spec.name,
        str(folder),
        params,
        str(sweep_file),
        local_artifact_location(uri, spec.output_dir),
        resume=False,
    )
    tracker.set_tag("wsss_ray.sweep_parent", "true")
    return tracker, uri


# --------------------------------------------------------------------------------- Tune pieces
def make_searcher(spec: SweepSpec):
    if spec.searcher.kind == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=spec.searcher.seed)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=spec.searcher.seed)


def make_scheduler(spec: SweepSpec, max_t: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = spec.scheduler
    if s.kind == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=max_t,
        grace_period=s.grace_period,
        reduction_factor=s.reduction_factor,
    )


def _value(result: dict, metric: str) -> float:
    v = result.get(metric)
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else math.nan


def _make_callback(
    spec: SweepSpec,
    max_t: int,
    children: ChildRuns | None,
    janitor: PlacementGroupJanitor | None,
):
    from ray import tune

    class Progress(tune.Callback):
        """A line per finished trial with its metric and the best so far; MLflow children."""

        def __init__(
            self, children_: ChildRuns | None, janitor_: PlacementGroupJanitor | None
        ) -> None:
            self.done = 0
            self.best: tuple[float, str] = (math.nan, "")
            self.rows: dict[str, TrialRow] = {}
            self.children_ = children_
            self.janitor_ = janitor_

        def _finish(self, trial: Any, status: str) -> None:
            res = dict(trial.last_result or {})
            iters = int(res.get("training_iteration", 0) or 0)
            value = _value(res, spec.metric)
            early = spec.info.train and status == "ok" and 0 < iters < max_t
            row = TrialRow(
                trial.trial_id,
                status,
                iters,
                value,
                early,
                float(res.get("time_total_s", 0.0) or 0.0),
                {k: _plain(v) for k, v in (trial.config or {}).items()},
                res,
            )
            self.rows[trial.trial_id] = row
            self.done += 1
            if _better(value, self.best[0], spec.mode):
                self.best = (value, trial.trial_id)
            what = "error" if status == "error" else f"{spec.metric} {_fmt(value)}"
            extra = f" after {iters} reports (stopped early by ASHA)" if early else ""
            if spec.info.train and not early and status == "ok":
                extra = f" after {iters} reports"
            say(
                f"trial {self.done}/{spec.num_samples} {trial.trial_id} {what}{extra} | best "
                f"{_fmt(self.best[0])} ({self.best[1] or '-'})"
            )
            if self.janitor_ is not None:
                self.janitor_.add(trial.trial_id)
            if self.children_ is not None:
                self.children_.add(row)

        def __getstate__(self) -> dict:  # Tune pickles its callbacks with the experiment
            return {**self.__dict__, "children_": None, "janitor_": None}

        def on_trial_complete(self, iteration, trials, trial, **info):  # noqa: ARG002
            self._finish(trial, "ok")

        def on_trial_error(self, iteration, trials, trial, **info):  # noqa: ARG002
            self._finish(trial, "error")

    return Progress(children, janitor)


def run_sweep(spec: SweepSpec) -> SweepResult:
    """Run ``spec`` (checked by ``load_sweep``) to the end; see the module docstring."""
    from ray import tune

    from wsss_ray.runtime import start_ray

    t_start = time.perf_counter()
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")  # trials see the launch directory
    spec = copy.deepcopy(spec)
    spec.output_dir = str(Path(spec.output_dir).resolve())
    spec.base_config = str(Path(spec.base_config).resolve())
    info = spec.info
    folder = Path(spec.output_dir) / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    base, fixed = resolve_base(spec)
    max_t = 1
    if info.train:
        max_t = spec.scheduler.max_t or full_trial_reports(base)
        if spec.scheduler.kind == "asha" and spec.scheduler.grace_period > max_t:
            raise SweepError(
                f"sweep error: scheduler.grace_period: {spec.scheduler.grace_period} is more "
                f"than a trial's {max_t} reports"
            )
        spec.scheduler.max_t = max_t
    sweep_file = folder / "sweep.yaml"
    sweep_file.write_text(spec_yaml(spec))
    say(
        f"sweep {spec.name}: {spec.method}, {spec.num_samples} trials, {spec.metric} "
        f"({spec.mode}), {spec.searcher.kind} + {spec.scheduler.kind}"
        + (f" (max_t {max_t} reports)" if spec.scheduler.kind == "asha" else "")
        + f", base {spec.base_config} -> {folder}"
    )

    trial_cpus = spec.trial_cpus or DEFAULT_TRIAL_CPUS[info.train]
    data = None
    if info.train:
        from wsss_ray.eval.periodic import load_validation_set
        from wsss_ray.train.driver import prepare

        prep = copy.deepcopy(base)
        prep.run.name = spec.name  # resolved base config -> <output_dir>/<name>/config.yaml
        prepare(prep)  # shards (synthetic ones generated once here, not by racing trials)
        load_validation_set(base, spec.output_dir)  # generates a synthetic val set once
        per_trial = train_trial_cpus(base) + trial_cpus
        start_ray(per_trial, base.ray.num_cpus)
    else:
        (folder / "config.yaml").write_text(to_yaml(base))
        t0 = time.perf_counter()
        data = prototype_data(base, spec.seed_images if spec.score == "seeds" else 0)
        say(
            f"cached features: {data['F'].shape[0]} patches x {data['F'].shape[1]} dims, "
            f"{data['Z'].shape[0]} prototypes ({time.perf_counter() - t0:.1f}s)"
            + (f"; seeds scored on {len(data['images'])} images" if spec.score == "seeds" else "")
        )
        per_trial = trial_cpus
        start_ray(per_trial, base.ray.num_cpus)
    import ray

    have = ray.cluster_resources().get("CPU", 0)
    if have < per_trial:
        raise SweepError(
            f"sweep error: one trial needs {per_trial:g} CPUs (workers, decode actors, a read "
            f"task) and the cluster has {have:g}: lower scaling.num_workers / "
            "data.decode_actors in fixed, or set ray.num_cpus"
        )
    concurrency = spec.concurrency or auto_concurrency(per_trial, base, info.train)
    say(f"concurrency {concurrency} (one trial reserves {per_trial:g} CPUs)")

    parent, uri = open_parent(spec, base, folder, sweep_file)
    children = None
    if parent is not None:
        from mlflow.tracking import MlflowClient

        exp_id = MlflowClient(uri).get_run(parent.run_id).info.experiment_id
        children = ChildRuns(uri, exp_id, parent.run_id, spec.name, info.train)
        say(f"MLflow: {uri} (sweep run {parent.run_id})")
    ctx = TrialContext(
        sweep=spec.name,
        method=spec.method,
        base_config=spec.base_config,
        fixed=fixed,
        parent_run_id=parent.run_id if parent else None,
        score=spec.score,
        threads=max(1, int(trial_cpus)),
    )
    if info.train:
        fn = tune.with_parameters(train_trial, ctx=ctx)
    else:
        fn = tune.with_parameters(prototype_trial, ctx=ctx, data=data)
    trainable = tune.with_resources(fn, {"cpu": trial_cpus})
    janitor = PlacementGroupJanitor(spec.name) if info.train else None
    callback = _make_callback(spec, max_t, children, janitor)
    tuner = tune.Tuner(
        trainable,
        param_space=tune_space(spec),
        tune_config=tune.TuneConfig(
            metric=spec.metric,
            mode=spec.mode,
            search_alg=make_searcher(spec),
            scheduler=make_scheduler(spec, max_t),
            num_samples=spec.num_samples,
            max_concurrent_trials=concurrency,
            reuse_actors=not info.train,
        ),
        run_config=tune.RunConfig(
            name=f"tune_{time.strftime('%Y%m%d_%H%M%S')}",
            storage_path=str(folder),
            callbacks=[callback],
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )
    t_fit = time.perf_counter()
    status = "FAILED"
    try:
        tuner.fit()
        status = "FINISHED"
    finally:
        fit_s = time.perf_counter() - t_fit
        if children is not None:
            children.close()
        if janitor is not None:
            janitor.close()
            if janitor.removed:
                say(f"removed {len(janitor.removed)} placement groups left by stopped trials")
        rows = list(callback.rows.values())
        best = pick_best(rows, spec.mode, max_t, info.train)
        result = _finish(spec, folder, rows, best, ctx, max_t, fit_s, parent, uri, status)
    say(f"sweep done in {time.perf_counter() - t_start:.1f}s ({fit_s:.1f}s of trials)")
    return result


def _finish(
    spec: SweepSpec,
    folder: Path,
    rows: list[TrialRow],
    best: TrialRow | None,
    ctx: TrialContext,
    max_t: int,
    fit_s: float,
    parent: Any,
    uri: str | None,
    status: str,
) -> SweepResult:
    info = spec.info
    write_trials_csv(folder / "trials.csv", rows, spec)
    best_path = None
    if best is not None:
        run_name = f"{spec.name}_best" if info.train else None  # phase 1 keeps its folder
        cfg = trial_config(ctx, best.params, run_name)
        best_path = folder / "best_config.yaml"
        best_path.write_text(
            f"# best trial {best.trial_id} of sweep {spec.name}: {spec.metric} {best.value:.6g}\n"
            f"# run it with: python {info.job} --config {best_path}\n" + to_yaml(cfg)
        )
        load_config(info.schema, str(best_path), [])  # the job accepts it unchanged
    early = sum(r.early_stopped for r in rows)
    errors = sum(r.status == "error" for r in rows)
    summary = {
        "sweep": spec.name,
        "method": spec.method,
        "metric": spec.metric,
        "mode": spec.mode,
        "trials": len(rows),
        "early_stopped": early,
        "errors": errors,
        "max_t": max_t,
        "seconds": fit_s,
        "trials_per_s": len(rows) / max(fit_s, 1e-9),
        "best_trial": best.trial_id if best else None,
        "best_value": best.value if best else None,
        "best_params": best.params if best else None,
        "best_config": str(best_path) if best_path else None,
    }
    (folder / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    print(table(rows, spec), flush=True)
    say(
        f"{len(rows)} trials in {fit_s:.1f}s ({summary['trials_per_s']:.2f} trials/s), "
        f"{early} stopped early, {errors} failed"
    )
    if best is not None:
        say(f"best trial {best.trial_id}: {spec.metric} {_fmt(best.value)} {best.params}")
        say(f"best config: {best_path}  (python {info.job} --config {best_path})")
    else:
        say("no trial reported the metric: no best config")
    if parent is not None:
        metrics = {"trials": len(rows), "early_stopped": early, "errors": errors}
        metrics["trials_per_s"] = summary["trials_per_s"]
        if best is not None:
            metrics[f"best/{spec.metric}"] = best.value
            parent.set_tag("best_trial_id", best.trial_id)
            parent.log_artifact(str(best_path))
        parent.log_metrics(metrics, 0)
        parent.log_artifact(str(folder / "trials.csv"))
        parent.log_artifact(str(folder / "results.json"))
        parent.finish(status)
    return SweepResult(
        spec,
        rows,
        best,
        best_path,
        folder,
        max_t,
        fit_s,
        parent.run_id if parent is not None else None,
        uri,
    )
