"""MLflow tracking: the driver opens (or reopens, on resume) one run per Ray Train run name and
logs the resolved config; rank 0 logs metrics, throughput, skipped samples and checkpoint paths.

Default tracking URI: ``sqlite:///<output_dir>/mlflow.db`` (MLflow 3 refuses plain file stores),
artifacts in ``<output_dir>/mlartifacts``;
``MLFLOW_TRACKING_URI`` (or ``tracking.uri``) points at a server for clusters. We use
``MlflowClient`` with explicit run ids so workers never depend on a global active run.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

RUN_NAME_TAG = "wsss_ray.run_name"
STORAGE_TAG = "wsss_ray.storage"


def local_artifact_location(uri: str, output_dir: str) -> str | None:
    """With a local sqlite store MLflow would put artifacts in ``./mlruns`` of whatever the
    working directory is; keep them beside the database instead."""
    if uri.startswith("sqlite:"):
        return (Path(output_dir).resolve() / "mlartifacts").as_uri()
    return None


def tracking_uri(cfg_uri: str, output_dir: str) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI", "")
    if env:
        return env
    if cfg_uri:
        return cfg_uri
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


@contextlib.contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API (``mlflow.start_run``, ``log_model``, ``models:/`` URIs) pointed at
    ``uri`` inside the block only. ``mlflow.set_tracking_uri`` also sets the
    ``MLFLOW_TRACKING_URI`` environment variable, which :func:`tracking_uri` reads first: left
    behind, it would send every later run of the process to this store."""
    import mlflow

    prev_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        if prev_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = prev_env
        try:  # back to "not set" (the env var, then the default), not to a pinned value
            import mlflow.tracking._tracking_service.utils as tracking_utils

            tracking_utils._tracking_uri = None
        except (ImportError, AttributeError):  # pragma: no cover - another MLflow layout
            mlflow.set_tracking_uri(prev_env or "")


class Tracker:
    """Thin wrapper over MlflowClient bound to one run. A disabled tracker does nothing."""

    def __init__(self, uri: str, run_id: str | None):
        self.uri, self.run_id = uri, run_id
        self._client = None
        if run_id:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=uri)

    @classmethod
    def open_run(
        cls,
        uri: str,
        experiment: str,
        run_name: str,
        storage: str,
        params: dict[str, Any],
        config_file: str | None,
        artifact_location: str | None = None,
        resume: bool = True,
    ) -> Tracker:
        """Reuse the run of the same name and storage (a resume), else create it; with
        ``resume=False`` (evaluations) always create a new run. ``artifact_location`` applies
        when the experiment is created (a tracking server chooses its own when it is None)."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)
        exp_id = (
            exp.experiment_id
            if exp
            else client.create_experiment(experiment, artifact_location=artifact_location)
        )
        found = resume and client.search_runs(
            [exp_id],
            filter_string=(
                f"tags.`{RUN_NAME_TAG}` = '{run_name}' and tags.`{STORAGE_TAG}` = '{storage}'"
            ),
            max_results=1,
        )
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
        else:
            run = client.create_run(
                exp_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, STORAGE_TAG: storage}
            )
            run_id = run.info.run_id
            from mlflow.entities import Param

            items = [Param(k, str(v)[:6000]) for k, v in params.items()]
            for i in range(0, len(items), 100):
                client.log_batch(run_id, params=items[i : i + 100])
        if config_file:
            client.log_artifact(run_id, config_file)
        return cls(uri, run_id)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self._client is None:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        self._client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        """A file, or a folder's files (under ``artifact_path``)."""
        if self._client is None:
            return
        if os.path.isdir(path):
            self._client.log_artifacts(self.run_id, path, artifact_path)
        else:
            self._client.log_artifact(self.run_id, path, artifact_path)

    def set_tag(self, key: str, value: str) -> None:
        if self._client is not None:
            self._client.set_tag(self.run_id, key, value)

    def finish(self, status: str = "FINISHED") -> None:
        if self._client is not None:
            self._client.set_terminated(self.run_id, status=status)


def log_job_run(
    cfg: Any,
    output_dir: str,
    folder: str,
    name: str,
    config_file: str,
    metrics: dict[str, float],
    artifacts: list[str] | tuple[str, ...] = (),
    folders: dict[str, str] | None = None,
    series: list[dict[str, float]] | None = None,
) -> str:
    """One new MLflow run for a job that is not a training run (evaluation, prototypes,
    pseudo-labels): the config as params and artifact, ``metrics`` at step 0, ``series[i]`` at
    step i, ``artifacts`` (files) and ``folders`` (folder -> artifact path). Prints
    where it went and returns the run id."""
    uri = tracking_uri(cfg.tracking.uri, output_dir)
    from wsss_ray.config import to_flat_dict

    tracker = Tracker.open_run(
        uri,
        cfg.tracking.experiment,
        name,
        folder,
        to_flat_dict(cfg),
        config_file,
        local_artifact_location(uri, output_dir),
        resume=False,
    )
    for i, values in enumerate(series or []):
        tracker.log_metrics(values, i)
    tracker.log_metrics(metrics, 0)
    for path in artifacts:
        tracker.log_artifact(path)
    for path, artifact_path in (folders or {}).items():
        tracker.log_artifact(path, artifact_path)
    tracker.finish()
    print(f"[wsss_ray] MLflow: {uri} (run {tracker.run_id})", flush=True)
    return tracker.run_id
