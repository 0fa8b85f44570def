"""A sweep's trials as the driver records them (``wsss_ray.tune.sweep``): the rows, their MLflow
child runs (one sqlite writer on a background thread), the clean-up of the placement groups of
trials ASHA stopped, and the result tables (best trial, Markdown table, trials.csv)."""

from __future__ import annotations

import csv
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsss_ray.tune.spec import SweepSpec
from wsss_ray.tune.trials import (
    PARENT_TAG,
    SWEEP_TAG,
    TRIAL_TAG,
    trial_run_name,
)

#: Tune's own result keys that are not worth an MLflow metric
TUNE_BOOKKEEPING = {
    "timestamp",
    "time_this_iter_s",
    "time_since_restore",
    "iterations_since_restore",
    "done",
    "pid",
}


def say(msg: str) -> None:
    print(f"[wsss_ray] {msg}", flush=True)


@dataclass
class TrialRow:
    trial_id: str
    status: str  # ok | error
    iterations: int
    value: float  # the sweep metric in the trial's last report (nan if none)
    early_stopped: bool
    seconds: float
    params: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)


class ChildRuns:
    """Writes the trials' MLflow child runs from the driver on a background thread (one sqlite
    writer, and Tune's event loop never waits on MLflow). Train trials created their own run;
    it is found by its trial-id tag and closed (with ``wsss_ray.early_stopped``)."""

    def __init__(self, uri: str, experiment_id: str, parent: str, sweep: str, train: bool):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.exp, self.parent, self.sweep, self.train = experiment_id, parent, sweep, train
        self.q: queue.Queue = queue.Queue()
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._work, daemon=True)
        self.thread.start()

    def add(self, row: TrialRow) -> None:
        self.q.put(row)

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        for err in self.errors[:3]:
            say(f"MLflow child run: {err}")

    def _work(self) -> None:
        while (row := self.q.get()) is not None:
            try:
                self._write(row)
            except Exception as err:  # tracking must never fail the sweep
                self.errors.append(f"{row.trial_id}: {type(err).__name__}: {err}")

    def find(self, trial_id: str) -> str | None:
        runs = self.client.search_runs(
            [self.exp],
            filter_string=f"tags.`{PARENT_TAG}` = '{self.parent}' and "
            f"tags.`{TRIAL_TAG}` = '{trial_id}'",
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def _write(self, row: TrialRow) -> None:
        from mlflow.entities import Metric, Param, RunTag

        status = "FINISHED" if row.status == "ok" else "FAILED"
        tags = {
            PARENT_TAG: self.parent,
            SWEEP_TAG: self.sweep,
            TRIAL_TAG: row.trial_id,
            "wsss_ray.early_stopped": str(row.early_stopped).lower(),
            "wsss_ray.iterations": str(row.iterations),
        }
        if self.train:
            run_id = self.find(row.trial_id)
            if run_id is None:  # the trial failed before it could open its run
                run_id = self._create(row.trial_id, tags)
            else:
                self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            current = self.client.get_run(run_id).info.status
            # a trial leaves its run RUNNING when it stops on an exception (killed or
            # interrupted by ASHA, or failed); runs closed by an older trial code as FAILED on
            # an early stop are corrected too: an early stop is not a failure
            if current == "RUNNING" or (row.early_stopped and current != status):
                self.client.set_terminated(run_id, status=status)
            return
        run_id = self._create(row.trial_id, tags)
        ts = int(time.time() * 1000)
        metrics = [
            Metric(k, float(v), ts, 0)
            for k, v in row.metrics.items()
            if k not in TUNE_BOOKKEEPING
            and isinstance(v, int | float)
            and not isinstance(v, bool)
            and math.isfinite(v)
        ]
        params = [Param(k, str(v)) for k, v in row.params.items()]
        self.client.log_batch(run_id, metrics=metrics, params=params)
        self.client.set_terminated(run_id, status=status)

    def _create(self, trial_id: str, tags: dict[str, str]) -> str:
        run = self.client.create_run(
            self.exp, run_name=trial_run_name(self.sweep, trial_id), tags=tags
        )
        return run.info.run_id


class PlacementGroupJanitor:
    """Removes the Train worker placement group a finished or stopped trial left behind (see
    ``trials._pg_recorder``), on a background thread: a trial that ended by itself has removed
    it already; one that ASHA stopped has not, and its CPUs would otherwise stay reserved until
    the sweep ends, starving the next trials."""

    def __init__(self, sweep: str, grace_s: float = 5.0):
        self.sweep, self.grace_s = sweep, grace_s
        self.q: queue.Queue = queue.Queue()
        self.removed: list[str] = []
        self.thread = threading.Thread(target=self._work, daemon=True)
        self.thread.start()

    def add(self, trial_id: str) -> None:
        self.q.put((time.monotonic() + self.grace_s, trial_id))

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()

    def _work(self) -> None:
        while (item := self.q.get()) is not None:
            due, trial_id = item
            time.sleep(max(0.0, due - time.monotonic()))
            try:
                self._clean(trial_id)
            except Exception as err:  # never fail the sweep over a cleanup
                say(f"placement group cleanup of trial {trial_id}: {err}")

    def _clean(self, trial_id: str) -> None:
        import ray
        from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_get
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        from wsss_ray.tune.trials import PG_NAMESPACE, pg_key

        key = pg_key(self.sweep, trial_id)
        value = _internal_kv_get(key, namespace=PG_NAMESPACE)
        if not value:
            return
        pg_id = value.decode()
        state = ray.util.placement_group_table().get(pg_id, {}).get("state", "REMOVED")
        if state != "REMOVED":
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
            self.removed.append(pg_id)
        _internal_kv_del(key, namespace=PG_NAMESPACE)


def _better(a: float, b: float, mode: str) -> bool:
    """a better than b (nan is never better)."""
    if math.isnan(a):
        return False
    return math.isnan(b) or (a > b if mode == "max" else a < b)


def _fmt(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{v:.4f}"


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


# ------------------------------------------------------------------------------------- output
def pick_best(rows: list[TrialRow], mode: str, max_t: int, train: bool) -> TrialRow | None:
    """The best trial by its last reported metric; for Train methods among the trials that ran
    to the end (ASHA's survivors) when there are any, since an early stop's last value was
    measured earlier in training."""
    ok = [r for r in rows if r.status == "ok" and not math.isnan(r.value)]
    if train and any(r.iterations >= max_t for r in ok):
        ok = [r for r in ok if r.iterations >= max_t]
    best = None
    for r in ok:
        if best is None or _better(r.value, best.value, mode):
            best = r
    return best


def table(rows: list[TrialRow], spec: SweepSpec, limit: int = 25) -> str:
    """Trials sorted best first: id, status, reports, metric, then the searched values."""
    keys = list(spec.parameters)
    sign = -1.0 if spec.mode == "max" else 1.0
    ordered = sorted(rows, key=lambda r: (math.isnan(r.value), sign * (r.value or 0.0)))
    head = ["trial", "status", "reports", spec.metric, *keys]
    lines = []
    for r in ordered[:limit]:
        status = r.status + (" (early)" if r.early_stopped else "")
        vals = [_short(r.params.get(k)) for k in keys]
        lines.append([r.trial_id, status, str(r.iterations), _fmt(r.value), *vals])
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    out += ["  ".join(x.ljust(w) for x, w in zip(line, widths)) for line in lines]
    if len(ordered) > limit:
        out.append(f"... {len(ordered) - limit} more in trials.csv")
    return "\n".join(out)


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_trials_csv(path: Path, rows: list[TrialRow], spec: SweepSpec) -> None:
    keys = list(spec.parameters)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            ["trial_id", "status", "reports", "early_stopped", spec.metric, "seconds", *keys]
        )
        for r in rows:
            w.writerow(
                [r.trial_id, r.status, r.iterations, r.early_stopped, r.value, f"{r.seconds:.3f}"]
                + [r.params.get(k) for k in keys]
            )


# ---------------------------------------------------------------------------------------- run
