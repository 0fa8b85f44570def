"""Sweep files: a YAML that names a method, its base job config and a search space over dotted
config keys, parsed into a typed :class:`SweepSpec` and checked before Ray starts.

Why a file of dotted keys rather than Python: a sweep is then reviewable, diffable and runnable
by ``jobs/sweep.py`` with ``key=value`` overrides like every other job, and every parameter is
checked against the job's own dataclass schema, so a typo (``optim.lrr``) is one line naming the
key instead of a cluster start-up followed by N identical failed trials.

Format (``configs/sweeps/*.yaml``; a file may hold several ``stages``, see :func:`load_sweep`)::

    name: pgseg_tiny                 # sweep name: MLflow parent run, <output_dir>/<name>/
    method: pgseg                    # pgseg | vpl_prototypes | vpl_seg
    base_config: configs/pgseg/tiny.yaml
    fixed: {train.max_steps: 60}     # dotted overrides applied to every trial
    metric: val/miou                 # what a trial reports
    mode: max                        # max | min
    num_samples: 16
    scheduler: {kind: asha, grace_period: 1, reduction_factor: 2, max_t: 0}
    searcher: {kind: optuna, seed: 0}
    concurrency: 0                   # 0 = cluster resources / per-trial resources
    parameters:
      optim.lr: {loguniform: [1.0e-4, 3.0e-3]}
      hrs.phi: {uniform: [0.0, 0.3]}
      npr.iters: {randint: [3, 16]}  # high exclusive, as tune.randint
      model.gumbel_tau: {choice: [0.5, 1.0, 2.0]}
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from wsss_ray.config import (
    ConfigError,
    VPLConfig,
    load_config,
)


class SweepError(ConfigError):
    """A sweep-file problem: one line naming the key, raised before Ray starts."""


@dataclass(frozen=True)
class Method:
    schema: type
    job: str  # the job that accepts the exported best config
    train: bool  # trials are Ray Train runs (ASHA can stop them) vs. cheap function trials


def _methods() -> dict[str, Method]:
    """The sweepable training tasks of the task registry, then VPL phase 1 (function trials)."""
    from wsss_ray.tasks.registry import TABLE, resolve

    out = {n: Method(resolve(s.schema), s.job, True) for n, s in TABLE.items() if s.sweep}
    out["vpl_prototypes"] = Method(VPLConfig, "jobs/vpl_prototypes.py", False)
    return out


METHODS: dict[str, Method] = _methods()

DISTRIBUTIONS = ("uniform", "loguniform", "choice", "randint")
SCHEDULERS = ("asha", "fifo")
SEARCHERS = ("optuna", "random")
#: what a vpl_prototypes trial reports, per ``score``
SCORE_METRICS = {
    "patch": ("patch/miou", "patch/acc", "proto/objective", "proto/iterations"),
    "seeds": (
        "seed/miou",
        "cam/miou",
        "patch/miou",
        "patch/acc",
        "proto/objective",
        "proto/iterations",
    ),
}
#: keys a sweep sets itself; sweeping them would break trial bookkeeping
RESERVED = ("run.name", "run.output_dir", "task")


@dataclass
class SchedulerSpec:
    kind: str = "asha"
    grace_period: int = 1  # reported iterations before a trial can be stopped
    reduction_factor: float = 2.0
    max_t: int = 0  # reported iterations of a full trial; 0 = computed from the job config


@dataclass
class SearcherSpec:
    kind: str = "optuna"
    seed: int = 0


@dataclass
class SweepSpec:
    name: str = ""
    method: str = ""
    base_config: str = ""
    fixed: dict[str, Any] = field(default_factory=dict)
    metric: str = ""
    mode: str = "max"
    num_samples: int = 8
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    searcher: SearcherSpec = field(default_factory=SearcherSpec)
    concurrency: int = 0  # 0 = from cluster resources / per-trial resources
    trial_cpus: float = 0.0  # CPUs Tune reserves per trial driver; 0 = 0.01 (Train), 1 (phase 1)
    output_dir: str = "outputs"  # also every trial's run.output_dir (one MLflow store)
    # vpl_prototypes only: score each W by patch mIoU on the cached features (cheap proxy) or
    # by CAM / CAA seed mIoU on the first seed_images images (needs the CLIP in every trial)
    score: str = "patch"
    seed_images: int = 16
    parameters: dict[str, Any] = field(default_factory=dict)
    stage: str = ""  # the stage this spec came from ('' for single-stage files)

    @property
    def info(self) -> Method:
        return METHODS[self.method]

    def fixed_overrides(self) -> list[str]:
        """``fixed`` plus the sweep's output folder as ``key=value`` strings."""
        items = {**dict(flatten(self.fixed)), "run.output_dir": self.output_dir}
        return [override(k, v) for k, v in items.items()]


# ------------------------------------------------------------------------------------- helpers
def plain(value: Any) -> Any:
    """numpy scalars (what Tune samples) -> Python scalars."""
    return value.item() if hasattr(value, "item") and not isinstance(value, list | dict) else value


def override(key: str, value: Any) -> str:
    """A ``key=value`` override whose value survives OmegaConf's parser exactly (JSON is YAML)."""
    return f"{key}={json.dumps(plain(value))}"


def flatten(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """``{"a": {"b": 1}, "c.d": 2}`` -> ``[("a.b", 1), ("c.d", 2)]`` (lists are leaves)."""
    if not isinstance(tree, dict):
        return [(prefix[:-1], tree)]
    out: list[tuple[str, Any]] = []
    for k, v in tree.items():
        out.extend(flatten(v, f"{prefix}{k}."))
    return out


def _flatten_parameters(tree: dict, prefix: str = "") -> dict[str, dict]:
    """Parameters may be written nested or dotted; a leaf is a mapping with one distribution."""
    out: dict[str, dict] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        leaf = isinstance(v, dict) and v and not any(isinstance(x, dict) for x in v.values())
        if leaf and set(v) <= set(DISTRIBUTIONS):
            out[key] = v
        elif leaf:
            bad = sorted(set(v) - set(DISTRIBUTIONS))[0]
            raise SweepError(
                f"sweep error: parameters.{key}: unknown distribution '{bad}' "
                f"(give one of {' | '.join(DISTRIBUTIONS)})"
            )
        elif isinstance(v, dict) and v:
            out.update(_flatten_parameters(v, f"{key}."))
        else:
            raise SweepError(
                f"sweep error: parameters.{key}: give one distribution "
                f"({' | '.join(DISTRIBUTIONS)}), e.g. {{loguniform: [1.0e-4, 1.0e-2]}}"
            )
    return out


def config_key_kind(schema: type, key: str) -> str:
    """'value', 'section' or 'unknown' for a dotted key of a dataclass schema."""
    obj: Any = schema()
    for part in key.split("."):
        if not is_dataclass(obj) or part not in {f.name for f in fields(obj)}:
            return "unknown"
        obj = getattr(obj, part)
    return "section" if is_dataclass(obj) else "value"


# ------------------------------------------------------------------------------------- loading
def load_sweep(path: str, overrides: list[str] | None = None) -> SweepSpec:
    """Read a sweep file, pick its stage, apply ``key=value`` overrides, check everything that can
    be checked without Ray (the parameters against the job's schema included). Raises
    :class:`SweepError` with one line naming the key.

    A file may hold ``stages: {name: {...}, ...}``: top-level keys are shared defaults, a stage's
    keys are merged over them; ``stage=NAME`` picks one (default: the first)."""
    overrides = list(overrides or [])
    if not os.path.isfile(path):
        raise SweepError(f"sweep error: --sweep file not found: {path}")
    for item in overrides:
        if "=" not in item:
            raise SweepError(f"sweep error: override '{item}' is not of the form key=value")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as err:  # a YAML syntax error: name the file
        raise SweepError(f"sweep error: {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"sweep error: {path}: expected a mapping at the top level")
    stage = ""
    for item in overrides:
        if item.startswith("stage="):
            stage = item.split("=", 1)[1]
    overrides = [o for o in overrides if not o.startswith("stage=")]
    stages = raw.pop("stages", None)
    if stages is not None:
        if not isinstance(stages, dict) or not stages:
            raise SweepError("sweep error: stages: a mapping of stage name -> sweep keys")
        stage = stage or next(iter(stages))
        if stage not in stages:
            raise SweepError(f"sweep error: stage: '{stage}' is not one of {', '.join(stages)}")
        raw = OmegaConf.to_container(OmegaConf.merge(raw, stages[stage] or {}))
        raw.setdefault("name", f"{Path(path).stem}_{stage}")
    elif stage:
        raise SweepError(f"sweep error: stage: {path} has no stages")
    raw.setdefault("name", Path(path).stem)
    raw["stage"] = stage
    params = raw.pop("parameters", None) or {}
    if not isinstance(params, dict):
        raise SweepError("sweep error: parameters: a mapping of config key -> distribution")
    param_over = [o for o in overrides if o.startswith("parameters.")]
    other = [o for o in overrides if not o.startswith("parameters.")]
    try:
        base = OmegaConf.merge(OmegaConf.structured(SweepSpec), raw)
        for item in other:
            base = OmegaConf.merge(base, OmegaConf.from_dotlist([item]))
        spec: SweepSpec = OmegaConf.to_object(base)  # type: ignore[assignment]
        ptree = OmegaConf.create(params)
        for item in param_over:
            key, value = item.split("=", 1)
            ptree = OmegaConf.merge(ptree, OmegaConf.from_dotlist([f"{key[11:]}={value}"]))
        params = OmegaConf.to_container(ptree)
    except ConfigError:
        raise
    except Exception as err:
        key = getattr(err, "full_key", None) or "?"
        msg = str(err).splitlines()[0].strip()
        if "not in" in msg or type(err).__name__ == "ConfigKeyError":
            raise SweepError(f"sweep error: unknown sweep key '{key}'") from None
        raise SweepError(f"sweep error: {key}: {msg}") from None
    spec.parameters = _flatten_parameters(params)
    spec.fixed = dict(flatten(spec.fixed))
    check_sweep(spec)
    return spec


def _need(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise SweepError(f"sweep error: {key}: {msg}")


def _number(key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise SweepError(f"sweep error: {key}: {v!r} is not a finite number")
    return float(v)


def check_distribution(key: str, dist: dict) -> None:
    """Shape checks of one ``{kind: args}`` entry."""
    where = f"parameters.{key}"
    _need(len(dist) == 1, where, f"exactly one of {' | '.join(DISTRIBUTIONS)}")
    ((kind, args),) = dist.items()
    if kind == "choice":
        _need(isinstance(args, list) and len(args) > 0, where, "choice needs a non-empty list")
        return
    _need(isinstance(args, list) and len(args) == 2, where, f"{kind} needs [low, high]")
    lo, hi = (_number(where, a) for a in args)
    _need(lo < hi, where, f"{kind} needs low < high, got [{args[0]}, {args[1]}]")
    if kind == "loguniform":
        _need(lo > 0, where, "loguniform needs low > 0")
    if kind == "randint":
        _need(
            all(isinstance(a, int) and not isinstance(a, bool) for a in args),
            where,
            "randint needs integers [low, high) (high exclusive)",
        )


def probe_values(dist: dict) -> list[Any]:
    """Values that bound what a distribution can sample (each checked against the schema)."""
    ((kind, args),) = dist.items()
    if kind == "choice":
        return list(args)
    if kind == "randint":
        return [int(args[0]), int(args[1]) - 1]
    return [float(args[0]), float(args[1])]


def check_sweep(spec: SweepSpec) -> None:
    """Everything about a sweep that needs no Ray: method, metric, scheduler, each parameter's
    key and range against the job's schema (a bad key is one line naming it)."""
    _need(spec.method in METHODS, "method", f"one of {' | '.join(METHODS)}")
    _need(bool(spec.name.strip()) and "/" not in spec.name, "name", "a non-empty folder name")
    _need(bool(spec.base_config), "base_config", "the job config file trials start from")
    _need(os.path.isfile(spec.base_config), "base_config", f"no such file: {spec.base_config}")
    _need(spec.mode in ("min", "max"), "mode", "max | min")
    _need(bool(spec.metric), "metric", "the reported metric to optimise, e.g. val/miou or loss")
    _need(spec.num_samples >= 1, "num_samples", "must be >= 1")
    _need(spec.concurrency >= 0, "concurrency", "must be >= 0 (0 = from cluster resources)")
    _need(spec.trial_cpus >= 0, "trial_cpus", "must be >= 0 (0 = method default)")
    _need(bool(spec.parameters), "parameters", "give at least one parameter to search")
    sch, sea = spec.scheduler, spec.searcher
    _need(sch.kind in SCHEDULERS, "scheduler.kind", " | ".join(SCHEDULERS))
    _need(sea.kind in SEARCHERS, "searcher.kind", " | ".join(SEARCHERS))
    _need(sch.grace_period >= 1, "scheduler.grace_period", "must be >= 1")
    _need(sch.reduction_factor > 1, "scheduler.reduction_factor", "must be > 1")
    _need(sch.max_t >= 0, "scheduler.max_t", "must be >= 0 (0 = a full trial's reports)")
    info = spec.info
    if not info.train:
        _need(
            sch.kind == "fifo",
            "scheduler.kind",
            f"{spec.method} trials report once (a solve is not iterative in Tune): use fifo",
        )
        _need(spec.score in SCORE_METRICS, "score", " | ".join(SCORE_METRICS))
        _need(spec.seed_images >= 1, "seed_images", "must be >= 1")
        reported = SCORE_METRICS[spec.score]
        _need(
            spec.metric in reported,
            "metric",
            f"{spec.method} trials with score={spec.score} report {', '.join(reported)}",
        )
    schema = info.schema
    for key in list(spec.fixed):
        _need(key not in RESERVED, f"fixed.{key}", "set by the sweep itself (use output_dir)")
        kind = config_key_kind(schema, key)
        _need(kind != "unknown", f"fixed.{key}", f"no such key in the {spec.method} job config")
    fixed = spec.fixed_overrides()
    try:
        load_config(schema, spec.base_config, fixed)
    except ConfigError as err:
        raise SweepError(f"sweep error: base_config + fixed: {err}") from None
    for key, dist in spec.parameters.items():
        _need(key not in RESERVED, f"parameters.{key}", "set by the sweep itself; not searchable")
        kind = config_key_kind(schema, key)
        _need(
            kind != "unknown",
            f"parameters.{key}",
            f"no such key in the {spec.method} job config ({schema.__name__})",
        )
        _need(kind == "value", f"parameters.{key}", "is a config section, not a value")
        check_distribution(key, dist)
        for value in probe_values(dist):
            try:
                load_config(schema, spec.base_config, [*fixed, override(key, value)])
            except ConfigError as err:
                raise SweepError(f"sweep error: parameters.{key} = {value!r}: {err}") from None


# ------------------------------------------------------------------------------- Tune objects
def tune_space(spec: SweepSpec) -> dict[str, Any]:
    """The parameters as Tune distributions, keyed by dotted config key."""
    from ray import tune

    space: dict[str, Any] = {}
    for key, dist in spec.parameters.items():
        ((kind, args),) = dist.items()
        if kind == "uniform":
            space[key] = tune.uniform(float(args[0]), float(args[1]))
        elif kind == "loguniform":
            space[key] = tune.loguniform(float(args[0]), float(args[1]))
        elif kind == "randint":
            space[key] = tune.randint(int(args[0]), int(args[1]))
        else:
            space[key] = tune.choice(list(args))
    return space


def describe_space(spec: SweepSpec) -> dict[str, str]:
    """``{"optim.lr": "loguniform[0.0001, 0.003]"}``: MLflow params of the parent run."""
    out = {}
    for key, dist in spec.parameters.items():
        ((kind, args),) = dist.items()
        out[key] = f"{kind}{json.dumps(args)}"
    return out


def spec_yaml(spec: SweepSpec) -> str:
    """The resolved sweep spec as YAML (reloadable with :func:`load_sweep`)."""
    data = OmegaConf.to_container(OmegaConf.structured(spec))
    data["parameters"] = dict(spec.parameters)
    data.pop("stage", None)
    return OmegaConf.to_yaml(OmegaConf.create(data))
