"""PGSeg end to end on a local Ray: 2 workers, DeepSpeed ZeRO-2 on CPU, tiny model on synthetic
shapes. Every loss term reaches MLflow and the total falls; periodic zero-shot validation runs
inside the training loop; ``jobs/eval_pgseg.py`` on the final checkpoint reproduces the last
validation mIoU exactly (same weights, same images, same settings) and logs to MLflow."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from jobs import eval_pgseg
from wsss_ray.config import PGSegPretrainConfig, load_config
from wsss_ray.train.driver import run

EVAL_DATA = [
    "data.max_images=8",
    "data.synthetic.num_train=2",
    "data.synthetic.num_val=8",
    "data.synthetic.image_size=64",
    "zero_shot.short_side=64",
    "zero_shot.window=64",
    "zero_shot.stride=32",
    "zero_shot.bg_thresh=0.3",
]


def test_pgseg_trains_and_logs_every_term(ray_local, tmp_path):
    cfg = load_config(
        PGSegPretrainConfig,
        "configs/pgseg/tiny.yaml",
        [
            f"run.output_dir={tmp_path}",
            "model.size=tiny",  # both grouping stages (the demo's tiny_seg has one)
            "train.max_steps=24",
            "train.batch_size_per_worker=32",
            "train.log_every=6",
            "train.ckpt_every=24",
            "data.synthetic.num_images=1024",
            "data.synthetic.image_size=64",
            "optim.warmup_steps=2",
            "data.decode_actors=[1,1]",
            *[f"eval.{o}" for o in EVAL_DATA],
            "eval.every=12",
        ],
    )
    summary = run(cfg)
    assert summary.metrics["step"] == 24
    client = MlflowClient(summary.tracking_uri)
    metrics = client.get_run(summary.mlflow_run_id).data.metrics
    for key in (
        "it_loss",
        "pg1_loss",
        "pg2_loss",
        "pg_text_loss",
        "hrs_kept_1",
        "hrs_kept_2",
        "hrs_kept_text",
        "group_usage_1",
        "group_usage_2",
        "samples_per_s",
    ):
        assert key in metrics, key
    loss = [
        m.value
        for m in sorted(
            client.get_metric_history(summary.mlflow_run_id, "loss"), key=lambda m: m.step
        )
    ]
    print("pgseg e2e loss per report:", loss)
    assert len(loss) == 4 and loss[-1] < loss[0] - 0.25, loss

    # periodic validation at steps 12 and 24, on both workers' halves of the 8 images
    val = client.get_metric_history(summary.mlflow_run_id, "val/miou")
    assert sorted(m.step for m in val) == [12, 24]
    assert "val/iou/background" in metrics and "val/pixel_acc" in metrics
    final_val = max(val, key=lambda m: m.step).value

    # the eval job on the final checkpoint: same number, plus baselines, overlays, MLflow
    rc = eval_pgseg.main(
        [
            "--config",
            "configs/pgseg/eval_tiny.yaml",
            f"run.output_dir={tmp_path}",
            f"model.checkpoint={summary.checkpoint}",
            "model.size=tiny",
            "num_overlays=2",
            "infer.actors=[1,1]",
            *EVAL_DATA,
        ]
    )
    assert rc == 0
    out = tmp_path / "eval_pgseg_tiny"
    results = json.loads((out / "results.json").read_text())
    print("periodic val mIoU", final_val, "eval job", results["miou"])
    assert results["images"] == 8
    assert abs(results["miou"] - final_val) < 1e-7
    for key in ("baseline/all_background_miou", "baseline/random_groups_miou", "pixel_acc"):
        assert 0.0 <= results[key] <= 100.0  # percent, as every mIoU we report
    # percent, not a fraction (at most 1): all background scores the background share (most
    # pixels) over at most 6 present classes
    assert results["baseline/all_background_miou"] > 5.0, results
    assert len(list((out / "overlays").glob("*.png"))) == 2
    assert "mIoU" in (out / "miou.txt").read_text()
    exp = client.get_experiment_by_name("wsss_ray")
    (ev_run,) = client.search_runs(
        [exp.experiment_id], filter_string="attributes.run_name = 'eval_pgseg_tiny'"
    )
    assert ev_run.data.metrics["miou"] == results["miou"]
    assert ev_run.data.metrics["baseline/all_background_miou"] > 0
    logged = {a.path for a in client.list_artifacts(ev_run.info.run_id)}
    assert {"miou.txt", "results.json", "overlays", "config.yaml"} <= logged


@pytest.mark.slow
def test_demo_segments_above_the_trivial_baselines(ray_local, tmp_path):
    """Issue 4's claim, on exactly what `make demo` runs (configs/pgseg/tiny.yaml, 600 steps,
    about 5-6 minutes on 2 cores) and what the eval command in docs/EVALUATION.md runs: zero-shot
    mIoU on the 48 unseen synthetic VOC-layout val images is above both trivial baselines (floor
    14.3, random group labels 3.4-5.9). Earlier recipes: 21.7, 16.7, 17.0, 10.1 (fails), 17.2;
    then 24.5, 13.2 (fails), 21.2, 15.4. The current tiny_seg (image tokens attend only to
    themselves): 33.6 and 39.2, with other seeds 44.5, 29.8, 29.6, then 35.3, and 31.4 after the
    reference-fidelity changes (docs/EVALUATION.md lists every run). "Clearly above": at least
    1.5x the floor and 3x random, which 7 of the 9 earlier runs missed and every current run
    clears."""
    cfg = load_config(
        PGSegPretrainConfig, "configs/pgseg/tiny.yaml", [f"run.output_dir={tmp_path}"]
    )
    summary = run(cfg)
    assert summary.metrics["step"] == 600
    rc = eval_pgseg.main(
        [
            "--config",
            "configs/pgseg/eval_tiny.yaml",
            f"run.output_dir={tmp_path}",
            f"model.checkpoint={summary.checkpoint}",
        ]
    )
    assert rc == 0
    res = json.loads((tmp_path / "eval_pgseg_tiny" / "results.json").read_text())
    floor = res["baseline/all_background_miou"]
    rand = res["baseline/random_groups_miou"]
    print(f"demo zero-shot mIoU {res['miou']:.1f}, all background {floor:.1f}, random {rand:.1f}")
    assert res["images"] == 48
    assert res["miou"] >= 1.5 * floor and res["miou"] > 3 * rand, res
