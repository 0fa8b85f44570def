"""End to end on a local Ray: 2 workers, DeepSpeed ZeRO-2 on CPU, the tiny CLIP on synthetic
shapes. The loss falls; a second fit() with the same storage and name resumes at the saved step;
MLflow holds the run's params, metrics and checkpoint location."""

from __future__ import annotations

import math

from mlflow.tracking import MlflowClient

from wsss_ray.config import ClipPretrainConfig, load_config
from wsss_ray.train.driver import run


def _cfg(out, steps):
    return load_config(
        ClipPretrainConfig,
        "configs/clip/tiny.yaml",
        [
            f"run.output_dir={out}",
            "run.name=e2e",
            f"train.max_steps={steps}",
            "train.batch_size_per_worker=32",
            "train.log_every=4",
            "train.ckpt_every=8",
            "data.synthetic.num_images=1024",
            "data.synthetic.image_size=64",
            "optim.warmup_steps=2",
            "data.decode_actors=[1,1]",
        ],
    )


def test_train_resume_and_mlflow(ray_local, tmp_path):
    first = run(_cfg(tmp_path, 16))
    assert first.metrics["step"] == 16
    assert first.checkpoint.endswith("checkpoint_step_00000016")
    client = MlflowClient(first.tracking_uri)
    loss = [
        m.value
        for m in sorted(
            client.get_metric_history(first.mlflow_run_id, "loss"), key=lambda m: m.step
        )
    ]
    assert len(loss) == 4

    second = run(_cfg(tmp_path, 24))
    assert second.mlflow_run_id == first.mlflow_run_id  # same MLflow run continues
    resumed = client.get_metric_history(second.mlflow_run_id, "resumed_from_step")
    assert sorted(m.value for m in resumed) == [0, 16]
    history = sorted(client.get_metric_history(second.mlflow_run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in history] == [4, 8, 12, 16, 20, 24]  # continued from 16, not from 0
    loss = [m.value for m in history]
    print("clip e2e loss per report:", loss)
    # it learns: after 20-24 steps the loss is clearly below its start, and so below chance
    # (log 64 = 4.16 for the global batch of 64); 16 steps alone sometimes only reach chance
    assert min(loss[-2:]) < min(loss[0] - 0.3, math.log(64) - 0.05), loss
    assert second.metrics["step"] == 24 and second.metrics["samples"] == 24 * 64

    data = client.get_run(first.mlflow_run_id).data
    assert data.params["train.batch_size_per_worker"] == "32"
    assert data.params["model.name"] == "wsss-tiny"
    for key in ("samples_per_s", "data/skipped", "contrastive_loss", "lr"):
        assert key in data.metrics
    assert data.tags["checkpoint/final"].endswith("checkpoint_step_00000024")
    artifacts = [a.path for a in client.list_artifacts(first.mlflow_run_id)]
    assert "config.yaml" in artifacts
    # artifacts live beside the database, not in ./mlruns of the working directory
    artifact_uri = client.get_run(first.mlflow_run_id).info.artifact_uri
    assert artifact_uri.startswith((tmp_path / "mlartifacts").as_uri()), artifact_uri
    assert (tmp_path / "e2e" / "config.yaml").exists()
